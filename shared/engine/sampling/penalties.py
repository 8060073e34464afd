"""Logit adjustments applied before temperature, each in place on float32 logits [B, V].

Every function takes one entry per row and skips rows whose entry is neutral (no bias, penalty 1.0,
frequency and presence 0, no stop ids), so a batch where nobody asked pays nothing. Token ids are
gathered into flat (row, token) index tensors on the host and applied with one indexed op per
function: no loop over the vocabulary.

Formulas (the same as SGLang / Hugging Face / OpenAI):
- logit_bias: `logit[t] += bias[t]` (keys are token ids as strings, as on the wire).
- repetition (HF/CTRL), over the prompt AND output tokens of the row, each distinct token once:
  `logit = logit / p if logit > 0 else logit * p`.
- frequency / presence (OpenAI), over the output tokens only:
  `logit -= frequency * count + presence * (count > 0)`.
- stop mask (min_new_tokens): `logit[t] = -inf` for the given ids; ids outside [0, V) are ignored
  (they can never be sampled anyway).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pdserve.shared.engine.sampling.transfer import to_device


def _flat_index(
    rows: Sequence[int], lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row index per element, token id per element, length per row) for `lists[k]` of row `rows[k]`.

    Built with numpy: torch.tensor(list) and CPU repeat_interleave cost ~10x more on long prompts;
    copied through pinned memory (sampling/transfer.py).
    """
    lengths = np.fromiter((len(ids) for ids in lists), dtype=np.int64, count=len(lists))
    tokens = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    row_idx = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    return (
        to_device(row_idx, torch.long, device),
        to_device(tokens, torch.long, device),
        to_device(lengths, torch.long, device),
    )


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[str, float] | None]) -> None:
    """Add each row's `{token_id_str: bias}`; keys that name the same id ("5", "05") add up."""
    rows = [i for i, b in enumerate(biases) if b]
    if not rows:
        return
    items = [[(int(tok), float(val)) for tok, val in biases[i].items()] for i in rows]
    row_idx, tokens, _ = _flat_index(rows, [[t for t, _ in it] for it in items], logits.device)
    values = to_device([v for it in items for _, v in it], logits.dtype, logits.device)
    logits.index_put_((row_idx, tokens), values, accumulate=True)


def apply_repetition_penalty(
    logits: torch.Tensor,
    penalties: Sequence[float],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> None:
    """HF/CTRL repetition penalty over each row's prompt + output tokens.

    All new values are computed from the values read before any write, so a token that occurs many
    times is penalised once (duplicate writes carry the same value).
    """
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    if not rows:
        return
    lists = [list(prompt_ids[i]) + list(output_ids[i]) for i in rows]
    row_idx, tokens, lengths = _flat_index(rows, lists, logits.device)
    if tokens.numel() == 0:
        return
    per_row = to_device([penalties[i] for i in rows], logits.dtype, logits.device)
    pen = torch.repeat_interleave(per_row, lengths, output_size=tokens.numel())  # a size known here: no sync
    vals = logits[row_idx, tokens]
    logits[row_idx, tokens] = torch.where(vals > 0, vals / pen, vals * pen)


def apply_frequency_presence(
    logits: torch.Tensor,
    frequency: Sequence[float],
    presence: Sequence[float],
    output_ids: Sequence[Sequence[int]],
) -> None:
    """OpenAI frequency/presence penalties from the counts of each row's output tokens.

    Counts are built densely ([rows that ask, V]) with an accumulating scatter of ones: exact
    integers whatever the order, and no host sync for a data-dependent size.
    """
    rows = [i for i in range(len(frequency)) if (frequency[i] != 0.0 or presence[i] != 0.0) and output_ids[i]]
    if not rows:
        return
    local = list(range(len(rows)))
    row_idx, tokens, _ = _flat_index(local, [output_ids[i] for i in rows], logits.device)
    counts = torch.zeros(len(rows), logits.shape[1], dtype=logits.dtype, device=logits.device)
    counts.index_put_((row_idx, tokens), torch.ones_like(tokens, dtype=logits.dtype), accumulate=True)
    freq = to_device([frequency[i] for i in rows], logits.dtype, logits.device)[:, None]
    pres = to_device([presence[i] for i in rows], logits.dtype, logits.device)[:, None]
    penalty = freq * counts + pres * (counts > 0).to(logits.dtype)
    rows_t = to_device(rows, torch.long, logits.device)
    logits.index_copy_(0, rows_t, logits.index_select(0, rows_t) - penalty)


def mask_tokens(logits: torch.Tensor, token_ids: Sequence[Iterable[int] | None]) -> None:
    """Set `logits[i, t] = -inf` for every t in `token_ids[i]` (None or empty: row untouched)."""
    vocab = logits.shape[1]
    rows, lists = [], []
    for i, ids in enumerate(token_ids):
        kept = sorted({t for t in ids or () if 0 <= t < vocab})
        if kept:
            rows.append(i)
            lists.append(kept)
    if not rows:
        return
    row_idx, tokens, _ = _flat_index(rows, lists, logits.device)
    logits[row_idx, tokens] = float("-inf")
