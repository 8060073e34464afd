"""What a query may see and how its scores are capped: the semantics every attention reference
(the kernels' `*_ref`s, the engine's torch backend) shares, in plain torch (no Triton import, so
the torch backend can use it without loading kernels).

- Causal: a query at position p sees keys at positions <= p.
- Sliding window `window` (None = none): and only keys at positions > p - window, Hugging Face's
  convention (transformers' `sliding_window_overlay`): the last `window` keys, p itself included.
- Logit soft-capping `softcap` (None = none): scores (already scaled) become
  softcap * tanh(scores / softcap) before the softmax (Gemma 2).
"""

from __future__ import annotations

import torch


def hidden_keys(key_positions: torch.Tensor, q_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, S] True where a query at `q_positions` may not see the key at `key_positions`."""
    hidden = key_positions[None, :] > q_positions[:, None]
    if window is not None:
        hidden |= key_positions[None, :] <= q_positions[:, None] - window
    return hidden


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(scores / softcap), or `scores` unchanged without a cap."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)
