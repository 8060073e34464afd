"""The fast-path pass: swaps the Triton kernels of pdserve.kernels into a built Llama-family model.

`use_triton_kernels(model)` replaces, in place:
- every RMSNorm (the decoder layers' two norms, the final norm, Qwen3's per-head q/k norms) by a
  `TritonRMSNorm` (both forms: plain, and residual-add + norm);
- every GatedMLP by a `TritonGatedMLP`: the same two projections, `silu_and_mul` between them;
- in every DecoderModel, `rotary_emb` by a `TritonRotaryEmbedding` and each layer's
  `self_attn.rotary` by a `TritonApplyRotary`. The two are swapped together: the new embedding
  hands over positions and inv_freq instead of cos/sin, and the rope kernel computes cos/sin.

Rules:
- Replacements hold the original Parameters and buffers under the same names: nothing is copied,
  and checkpoint loading, weight updates and `reset_buffers` work the same after the pass.
- Only modules of exactly these torch types are swapped, so a second pass changes nothing and
  unknown subclasses are left alone. The return value counts the modules replaced.
- Inference only: the kernels have no backward, and they write in place where their docstrings
  say so (fused_add_rmsnorm into its x and residual, rope into q and k).
- The model runner applies it on CUDA; on CPU the kernels run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from pdserve.kernels.rope import apply_rotary
from pdserve.shared.models.layers import GatedMLP, RMSNorm
from pdserve.shared.models.llama import ApplyRotary, DecoderModel
from pdserve.shared.models.rope import RotaryEmbedding


class TritonRMSNorm(RMSNorm):
    """RMSNorm through the Triton kernels; `forward(x, residual)` writes into x and residual."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)  # not RMSNorm.__init__: it would allocate a weight we then drop
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rmsnorm(x, self.weight, self.eps)
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)


class TritonGatedMLP(GatedMLP):
    """down(silu_and_mul(gate_up(x))) over the original projections."""

    def __init__(self, mlp: GatedMLP):
        nn.Module.__init__(self)  # not GatedMLP.__init__: it would allocate both projections
        self.intermediate_size = mlp.intermediate_size
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1]))
        return self.down_proj(act.reshape(*x.shape[:-1], self.intermediate_size))


class RopeInputs(NamedTuple):
    """What TritonRotaryEmbedding hands the layers instead of cos/sin."""

    positions: torch.Tensor  # [T] int64
    inv_freq: torch.Tensor  # [head_dim // 2] float32
    attention_scaling: float


class TritonRotaryEmbedding(nn.Module):
    """Stands in for RotaryEmbedding: keeps its inv_freq buffer (same name) and computes nothing."""

    def __init__(self, rotary: RotaryEmbedding):
        super().__init__()
        # The host copy lets reset_buffers rebuild inv_freq after a meta-device build, as the original.
        self._host_inv_freq = rotary._host_inv_freq
        self.attention_scaling = rotary.attention_scaling
        self.register_buffer("inv_freq", rotary.inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = self._host_inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> RopeInputs:
        return RopeInputs(positions, self.inv_freq, self.attention_scaling)


class TritonApplyRotary(nn.Module):
    """Stands in for llama.ApplyRotary: rotates q and k in place with the rope kernel."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, rope: RopeInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, rope.positions, rope.inv_freq, rope.attention_scaling)


def _rope_swappable(decoder: DecoderModel) -> bool:
    return type(decoder.rotary_emb) is RotaryEmbedding and all(
        type(layer.self_attn.rotary) is ApplyRotary for layer in decoder.layers
    )


def use_triton_kernels(model: nn.Module) -> int:
    """Swaps the Triton RMSNorm, rope and SiLU-and-mul into `model` (see the module rules).

    Returns the number of modules replaced (0 when the pass already ran).
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for module in model.modules():
        if isinstance(module, DecoderModel) and _rope_swappable(module):
            swaps.append((module, "rotary_emb", TritonRotaryEmbedding(module.rotary_emb)))
            swaps.extend((layer.self_attn, "rotary", TritonApplyRotary()) for layer in module.layers)
        for name, child in module.named_children():
            if type(child) is RMSNorm:
                swaps.append((module, name, TritonRMSNorm(child)))
            elif type(child) is GatedMLP:
                swaps.append((module, name, TritonGatedMLP(child)))
    # Collected first, applied after: replacing children while walking modules() would revisit them.
    for parent, name, replacement in swaps:
        setattr(parent, name, replacement)
    return len(swaps)
