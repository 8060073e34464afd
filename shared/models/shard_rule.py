"""What a tensor-parallel rank loads of a full checkpoint tensor: `ShardRule`, one slice of one
dim (or, for a tensor that fuses several projections, one slice of each part, concatenated).

    ShardRule(0, 8, 8).apply(w)                      # w[8:16]
    ShardRule(0, 8, 8, rest=((40, 4),)).apply(w)     # cat(w[8:16], w[40:44])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardRule:
    """A rank's slice of a checkpoint tensor: `length` entries of `dim` from `start`, followed by
    the (start, length) pieces of `rest` along the same dim (the rank's part of each projection of
    a fused tensor: Phi-3's qkv_proj, fused MoE experts' gate_up_proj); entries past the tensor's
    end (vocabulary padding) are zeros."""

    dim: int
    start: int
    length: int
    rest: tuple[tuple[int, int], ...] = ()

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        first = self._piece(tensor, self.start, self.length)
        if not self.rest:
            return first
        pieces = [first, *(self._piece(tensor, start, length) for start, length in self.rest)]
        return torch.cat(pieces, dim=self.dim)

    def _piece(self, tensor: torch.Tensor, start: int, length: int) -> torch.Tensor:
        size = tensor.shape[self.dim]
        start = min(start, size)
        available = min(length, size - start)
        piece = tensor.narrow(self.dim, start, available)
        if available == length:
            return piece
        pad_shape = list(tensor.shape)
        pad_shape[self.dim] = length - available
        return torch.cat([piece, tensor.new_zeros(pad_shape)], dim=self.dim)


def projection_rules(prefix: str, names: Iterable[str], rule: ShardRule, bias: bool) -> dict[str, ShardRule]:
    """The rule for each named projection's weight (and bias) under `prefix`."""
    attrs = ("weight", "bias") if bias else ("weight",)
    return {f"{prefix}.{name}.{attr}": rule for name in names for attr in attrs}
