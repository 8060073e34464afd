"""Exponential noise for the "exponential race": argmax(probs / E), E ~ Exp(1) i.i.d. per token,
draws a token with probability exactly probs / sum(probs) (masked tokens have prob 0 and lose).

Randomness per row:
- a row with a `sampling_seed` gets its noise from a generator re-seeded with
  `row_seed(sampling_seed, step)` (step = tokens generated so far), so its token depends only on
  its own logits, seed and step: not on the batch around it, its position, or what ran before.
  The stream differs between device types (CPU vs CUDA generators), never between batches.
- other rows share the sampler's generator (seeded once by the worker's --random-seed), drawn in
  one call for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.shared.engine.sampling.transfer import to_device

_MASK64 = (1 << 64) - 1


def row_seed(sampling_seed: int, step: int) -> int:
    """Mix (seed, step) into a generator seed in [0, 2**63) with splitmix64.

    A hash rather than `seed + step`, so seed s at step 1 and seed s+1 at step 0 do not share noise.
    """
    z = (sampling_seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class ExponentialNoise:
    """Draws [rows, V] float32 Exp(1) noise on `device`; owns its generators (no global state)."""

    # Exp(1) can return exactly 0; a 0 would turn prob/0 into inf (or nan for a masked token).
    _FLOOR = 1e-10

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        self._shared.manual_seed(seed)
        # One generator re-seeded per seeded row; on CUDA the seed/offset are read at kernel launch,
        # so re-seeding it for the next row cannot affect the previous row's draw.
        self._per_row = torch.Generator(device=device)

    def draw(self, seeds: Sequence[int | None], steps: Sequence[int], vocab: int) -> torch.Tensor:
        noise = torch.empty(len(seeds), vocab, dtype=torch.float32, device=self.device)
        unseeded = [i for i, s in enumerate(seeds) if s is None]
        if len(unseeded) == len(seeds):
            noise.exponential_(generator=self._shared)
        elif unseeded:
            shared = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=self.device)
            shared.exponential_(generator=self._shared)
            noise.index_copy_(0, to_device(unseeded, torch.long, self.device), shared)
        for i, seed in enumerate(seeds):
            if seed is not None:
                self._per_row.manual_seed(row_seed(seed, steps[i]))
                noise[i].exponential_(generator=self._per_row)
        return noise.clamp_min_(self._FLOOR)
