"""Logprobs reported to clients: log_softmax of the RAW logits in float32 (before logit_bias,
penalties, temperature and filters), the convention of SGLang's default and of transformers'
`log_softmax(logits)` that the parity tests compare with.

Per position three things can be asked:
- the logprob of one token (the sampled one, or for prompt positions the next prompt token);
- the top-n list: `[(logprob, token_id), ...]`, best first, ties by lowest id, length min(n, V);
- the logprobs of given ids: `[(logprob, token_id), ...]` in the asked order (duplicates kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pdserve.shared.engine.sampling.filters import top_k_sorted

TopList = list[tuple[float, int]]

# log_softmax over [N, V] allocates N*V floats; prompt positions are processed in row chunks of at
# most this many elements (256 MiB of float32) so a long chunked-prefill run stays bounded.
DEFAULT_MAX_CHUNK_ELEMS = 1 << 26


class TokenLogprobs(NamedTuple):
    """Per position: the token's logprob, its top list (None: not asked), its asked-ids list.

    A named tuple, so callers may unpack it: `lps, tops, id_lps = token_logprobs(...)`.
    """

    logprobs: list[float]
    top_logprobs: list[TopList | None]
    token_ids_logprobs: list[TopList | None]


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim, computed in float32 whatever the input dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    top_nums: Sequence[int],
    ids_lists: Sequence[Sequence[int] | None],
) -> TokenLogprobs:
    """Read the asked values out of `logprobs` [R, V] (already log-softmaxed).

    token_ids [R] long: one id per row. top_nums[r] <= 0 gives None for that row, as does
    ids_lists[r] is None. Raises ValueError for an asked id outside [0, V).
    """
    rows, vocab = logprobs.shape
    chosen = logprobs.gather(1, token_ids.to(logprobs.device).long().view(rows, 1)).view(rows).tolist()

    tops: list[TopList | None] = [None] * rows
    top_rows = [r for r in range(rows) if top_nums[r] > 0]
    if top_rows:
        k = max(top_nums[r] for r in top_rows)
        sub = logprobs[torch.tensor(top_rows, dtype=torch.long, device=logprobs.device)]
        vals, ids = top_k_sorted(sub, k)
        vals_l, ids_l = vals.tolist(), ids.tolist()
        for j, r in enumerate(top_rows):
            n = top_nums[r]
            tops[r] = list(zip(vals_l[j][:n], ids_l[j][:n]))

    asked: list[TopList | None] = [None] * rows
    id_rows = [r for r in range(rows) if ids_lists[r] is not None]
    if id_rows:
        flat_rows = [r for r in id_rows for _ in ids_lists[r]]
        flat_ids = [int(t) for r in id_rows for t in ids_lists[r]]
        bad = [t for t in flat_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token_ids_logprob has ids outside the vocabulary [0, {vocab}): {bad[:8]}")
        values = logprobs[
            torch.tensor(flat_rows, dtype=torch.long, device=logprobs.device),
            torch.tensor(flat_ids, dtype=torch.long, device=logprobs.device),
        ].tolist()
        pos = 0
        for r in id_rows:
            n = len(ids_lists[r])
            asked[r] = list(zip(values[pos : pos + n], flat_ids[pos : pos + n]))
            pos += n
    return TokenLogprobs(chosen, tops, asked)


def token_logprobs(
    logits: torch.Tensor,
    next_ids: torch.Tensor | Sequence[int],
    top_n: int = 0,
    token_ids: Sequence[int] | None = None,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> TokenLogprobs:
    """Prompt logprobs: for positions i of a run of prompt logits [N, V], the raw logprob of
    next_ids[i] (the prompt token that follows position i), the top_n list (None when top_n <= 0)
    and the logprobs of `token_ids` (None when not given). Same conventions as decode logprobs.

    The engine passes logits of positions p..q-1 and next_ids = prompt[p+1..q]; the first prompt
    token has no logprob (nothing precedes it) and is the caller's `None`.
    """
    n_pos, vocab = logits.shape
    ids_t = torch.as_tensor(next_ids, dtype=torch.long, device=logits.device)
    if ids_t.shape != (n_pos,):
        raise ValueError(f"next_ids must have shape [{n_pos}], got {tuple(ids_t.shape)}")
    out = TokenLogprobs([], [], [])
    step = max(1, max_chunk_elems // max(vocab, 1))
    for start in range(0, n_pos, step):
        end = min(n_pos, start + step)
        part = gather_logprobs(
            raw_logprobs(logits[start:end]),
            ids_t[start:end],
            [top_n] * (end - start),
            [token_ids] * (end - start),
        )
        out.logprobs.extend(part.logprobs)
        out.top_logprobs.extend(part.top_logprobs)
        out.token_ids_logprobs.extend(part.token_ids_logprobs)
    return out
