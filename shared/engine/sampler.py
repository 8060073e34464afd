"""The sampler: one next token per request row from logits [B, V], plus the logprobs it asked for.

Per row, in this order (each step skipped for rows that do not ask for it), all in float32:

1. logit_bias: `logit[t] += bias` for each `{str(token_id): bias}` entry.
2. repetition_penalty p (HF/CTRL), over the distinct tokens of prompt + output:
   positive logits are divided by p, negative ones multiplied by p.
3. frequency f / presence q (OpenAI), over the output tokens only:
   `logit[t] -= f * count(t) + q * (count(t) > 0)`.
4. min_new_tokens: while len(output_ids) < min_new_tokens, every id in eos_token_ids and
   stop_token_ids gets -inf, so the row cannot stop early. The engine passes the eos ids it wants
   masked (this module does not look at ignore_eos).
   Then the grammar's token bitmask, where the batch has one (constrained decoding, grammar.py):
   tokens whose bit is clear get -inf; rows of unconstrained requests are all ones and untouched.
5. greedy rows (temperature == 0 or top_k == 1) take argmax of these logits, ties to the lowest id
   (torch.argmax); nothing below applies to them and they consume no randomness.
6. temperature: logits / max(T, 1e-5) (the floor keeps a tiny T from overflowing to nan).
7. top_k: keep exactly k tokens, ties at the k-th value to the lowest ids; the rest get -inf.
8. softmax, then top_p over that (already top_k-renormalised) distribution: keep the shortest
   prefix, by descending probability with ties to the lowest id, whose mass reaches top_p; the
   token that crosses the threshold stays. top_p == 1 keeps everything.
9. min_p: keep tokens with prob >= min_p * max prob (ties at the threshold stay).
10. sample by exponential race: argmax(probs / E), E ~ Exp(1) per token (exactly categorical).
    A row with `sampling_seed` draws E from a generator seeded by (sampling_seed, len(output_ids)),
    so its token depends only on its own logits, seed and step, never on the rest of the batch or
    its order; other rows share the sampler's generator (seeded by the worker's --random-seed).
    See `sampling/noise.py`.

Reported logprobs (the chosen token's, the top-n list and the asked ids) are log_softmax of the
RAW logits in float32, before any step above, and only for rows with return_logprob; see
`sampling/logprobs.py` (which also holds `token_logprobs`, the prompt-logprob helper).

Logits wider than vocab_size (padded lm_head) are cut to vocab_size: padding is never sampled and
takes no part in logprobs. A batch of greedy rows without penalties, masks or logprobs is one argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref
from pdserve.shared.engine.sampling.filters import min_p_mask, top_k_mask, top_p_mask
from pdserve.shared.engine.sampling.logprobs import TokenLogprobs, TopList, gather_logprobs, token_logprobs
from pdserve.shared.engine.sampling.noise import ExponentialNoise
from pdserve.shared.engine.sampling.penalties import (
    apply_frequency_presence,
    apply_logit_bias,
    apply_repetition_penalty,
    mask_tokens,
)
from pdserve.shared.engine.sampling.transfer import to_device
from pdserve.shared.engine.sampling_params import SamplingParams

__all__ = ["SampleOutput", "Sampler", "SamplingInputs", "TokenLogprobs", "reads_output_ids", "token_logprobs"]


@dataclass
class SamplingInputs:
    """One row per request in the batch, built on the host by the model runner."""

    params: list[SamplingParams]
    prompt_ids: list[list[int]]  # repetition_penalty applies to prompt + output tokens
    output_ids: list[list[int]]  # tokens generated so far; len() is the seeded row's step
    eos_token_ids: list[frozenset[int]]  # masked, with stop_token_ids, until min_new_tokens
    top_logprobs_num: list[int]  # 0 = none
    token_ids_logprob: list[list[int] | None]
    return_logprob: list[bool]
    # Tokens generated so far per row, counting those still in flight on the device (overlap
    # scheduling; their ids are unknown, so such a row must not ask for penalties). None: len(output_ids).
    num_generated: list[int] | None = None
    # Constrained decoding: [B, ceil(V/32)] int32 on the logits' device (kernels/token_bitmask.py).
    token_bitmask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.params)

    def generated_counts(self) -> list[int]:
        """Per row, the step min_new_tokens and seeded noise go by."""
        if self.num_generated is not None:
            return self.num_generated
        return [len(o) for o in self.output_ids]


@dataclass
class SampleOutput:
    next_token_ids: list[int]
    logprobs: list[float | None]  # chosen token's raw logprob; None where return_logprob is False
    top_logprobs: list[TopList | None]  # (logprob, token_id), best first
    token_ids_logprobs: list[TopList | None]  # for the asked ids, in the asked order


# Below this a sampled row is effectively greedy; logits / 1e-5 stays far from float32's range.
_MIN_TEMPERATURE = 1e-5


def _is_plain_greedy(p: SamplingParams, num_output: int) -> bool:
    """Greedy with nothing that changes the argmax: such a row is just argmax(raw logits)."""
    return (
        p.is_greedy
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and num_output >= p.min_new_tokens
    )


def reads_output_ids(p: SamplingParams) -> bool:
    """Whether sampling a row reads the ids of its generated tokens (penalties), not only their
    count: such a row cannot be sampled while one of its tokens is still on the device."""
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class Sampler:
    """Stateless per batch apart from its generators; one instance per model runner."""

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._noise = ExponentialNoise(self.device, seed)

    def sample(self, logits: torch.Tensor, inputs: SamplingInputs) -> SampleOutput:
        """Next token per row of logits [B, V >= vocab_size] (any float dtype; not modified)."""
        return self.read(logits, self.sample_on_device(logits, inputs), inputs)

    def sample_on_device(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """The next ids [B] (int64), left on the logits' device. A batch of plain greedy rows costs
        no host sync, so a caller can launch the next step before reading them (overlap scheduling);
        other rows build small index tensors on the host, whose copies wait for the device."""
        batch = logits.shape[0]
        if len(inputs) != batch:
            raise ValueError(f"{len(inputs)} sampling rows for {batch} rows of logits")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, vocab_size is {self.vocab_size}")
        logits = logits[:, : self.vocab_size]
        counts = inputs.generated_counts()
        if inputs.token_bitmask is None and all(
            _is_plain_greedy(p, n) for p, n in zip(inputs.params, counts)
        ):
            return logits.argmax(dim=-1)  # exact on the raw dtype: widening to float32 keeps order
        return self._sample_processed(logits, inputs)

    def read(self, logits: torch.Tensor, next_ids: torch.Tensor, inputs: SamplingInputs) -> SampleOutput:
        """The ids of `sample_on_device` on the host, with the logprobs the rows ask for (a host
        sync); `logits` must still hold what sample_on_device was given."""
        return self._with_logprobs(logits[:, : self.vocab_size], next_ids, inputs)

    def prompt_logprobs(
        self,
        logits: torch.Tensor,
        next_ids: torch.Tensor | Sequence[int],
        top_n: int = 0,
        token_ids: Sequence[int] | None = None,
    ) -> TokenLogprobs:
        """`token_logprobs` on logits [N, V >= vocab_size] cut to the vocabulary (see logprobs.py)."""
        return token_logprobs(logits[:, : self.vocab_size], next_ids, top_n, token_ids)

    def _sample_processed(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        params, outputs, counts = inputs.params, inputs.output_ids, inputs.generated_counts()
        x = logits.to(torch.float32, copy=True)
        apply_logit_bias(x, [p.logit_bias for p in params])
        apply_repetition_penalty(x, [p.repetition_penalty for p in params], inputs.prompt_ids, outputs)
        apply_frequency_presence(
            x, [p.frequency_penalty for p in params], [p.presence_penalty for p in params], outputs
        )
        mask_tokens(
            x,
            [
                (eos | frozenset(p.stop_token_ids)) if n < p.min_new_tokens else None
                for p, eos, n in zip(params, inputs.eos_token_ids, counts)
            ],
        )

        if inputs.token_bitmask is not None:
            apply_bitmask = apply_token_bitmask if x.is_cuda else apply_token_bitmask_ref
            apply_bitmask(x, inputs.token_bitmask)

        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sampled:
            return x.argmax(dim=-1)
        if len(sampled) == len(params):
            return self._sample_rows(x, params, counts)
        next_ids = x.argmax(dim=-1)  # greedy rows; sampled rows overwritten below
        idx = to_device(sampled, torch.long, x.device)
        drawn = self._sample_rows(
            x.index_select(0, idx), [params[i] for i in sampled], [counts[i] for i in sampled]
        )
        return next_ids.index_copy_(0, idx, drawn)

    def _sample_rows(
        self, x: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]
    ) -> torch.Tensor:
        """Steps 6-10 of the module docstring on non-greedy rows x [S, V] (modified in place)."""
        device, vocab = x.device, x.shape[1]
        # A floor, because a tiny temperature would overflow logits / T to inf and softmax to nan.
        temps = [max(p.temperature, _MIN_TEMPERATURE) for p in params]
        x.div_(to_device(temps, torch.float32, device)[:, None])

        k_rows = [i for i, p in enumerate(params) if p.top_k < vocab]
        if k_rows:
            idx = to_device(k_rows, torch.long, device)
            sub = x.index_select(0, idx)
            ks = [params[i].top_k for i in k_rows]
            keep = top_k_mask(sub, to_device(ks, torch.long, device), k_max=max(ks))
            x.index_copy_(0, idx, sub.masked_fill_(~keep, float("-inf")))

        probs = torch.softmax(x, dim=-1)
        p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            idx = to_device(p_rows, torch.long, device)
            sub = probs.index_select(0, idx)
            top_p = to_device([params[i].top_p for i in p_rows], torch.float32, device)
            # When every such row also has a top_k, its nucleus lies within its k best: sort only those.
            support = max(params[i].top_k for i in p_rows)
            keep = top_p_mask(sub, top_p, support=support if support < vocab else None)
            probs.index_copy_(0, idx, sub.masked_fill_(~keep, 0.0))
        if any(p.min_p > 0.0 for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32, device)
            probs.masked_fill_(~min_p_mask(probs, min_p), 0.0)

        noise = self._noise.draw([p.sampling_seed for p in params], steps, vocab)
        return (probs / noise).argmax(dim=-1)

    def _with_logprobs(
        self, logits: torch.Tensor, next_ids: torch.Tensor, inputs: SamplingInputs
    ) -> SampleOutput:
        batch = len(inputs)
        out = SampleOutput(next_ids.tolist(), [None] * batch, [None] * batch, [None] * batch)
        rows = [i for i in range(batch) if inputs.return_logprob[i]]
        if not rows:
            return out
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        got = gather_logprobs(
            lp,
            next_ids.index_select(0, idx.to(next_ids.device)),
            [inputs.top_logprobs_num[i] for i in rows],
            [inputs.token_ids_logprob[i] for i in rows],
        )
        for j, i in enumerate(rows):
            out.logprobs[i] = got.logprobs[j]
            out.top_logprobs[i] = got.top_logprobs[j]
            out.token_ids_logprobs[i] = got.token_ids_logprobs[j]
        return out
