"""Building blocks shared by the decoder models: RMSNorm, merged projections, the gated MLP.

All are plain torch; Triton versions live in pdserve.kernels and are swapped in by passes over the
model, not here. Numerics follow Hugging Face so float32 logits match it to ~1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 like HF (weight applied in the input dtype).

    `forward(x)` returns the normed x. `forward(x, residual)` first adds: s = x + residual, and
    returns (norm(s), s), so decoder layers carry the residual stream without extra copies.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed


class MergedLinear(nn.Linear):
    """Several checkpoint projections that read the same input, stacked along the output dim.

    `shards` maps each checkpoint module name (e.g. "q_proj") to its output size, in order; one
    matmul replaces several on the hot path. `shard_rows(name)` says where a checkpoint tensor goes.
    """

    def __init__(
        self, in_features: int, shards: dict[str, int], bias: bool, dtype: torch.dtype | None = None
    ):
        super().__init__(in_features, sum(shards.values()), bias=bias, dtype=dtype)
        self.shards: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shards[name] = (offset, size)
            offset += size

    def shard_rows(self, name: str) -> slice:
        offset, size = self.shards[name]
        return slice(offset, offset + size)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up merged into one matmul."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size,
            {"gate_proj": intermediate_size, "up_proj": intermediate_size},
            bias=bias,
            dtype=dtype,
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)
