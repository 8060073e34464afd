"""Random MoE routing for the fused-MoE kernel tests."""

from __future__ import annotations

import torch


def random_routing(tokens: int, top_k: int, lo: int, hi: int, gen: torch.Generator):
    """(weights in (0, 1) [T, k], int32 ids in [lo, hi) [T, k], repeats allowed)."""
    ids = torch.randint(lo, hi, (tokens, top_k), generator=gen, dtype=torch.int32)
    return torch.rand(tokens, top_k, generator=gen), ids
