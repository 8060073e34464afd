"""A pass over a fast-path fp8 model: the kernels that produce an Fp8Linear's input quantize it.

Without it every Fp8Linear quantizes its input rows in a launch of its own. `fuse_fp8_inputs(model)`
runs after shared.models.fast_path.use_triton_kernels and swaps, in each Llama-family DecoderLayer:
- `input_layernorm` (a TritonRMSNorm) by an `Fp8InputRMSNorm` when the layer's attention is the
  family's (`Attention`, or the fast path's `RopeFusedAttention`) and its qkv_proj an Fp8Linear;
- `post_attention_layernorm` by an `Fp8InputRMSNorm` when the MLP is the fast path's
  TritonGatedMLP and its gate_up_proj an Fp8Linear;
- that TritonGatedMLP by an `Fp8InputGatedMLP` (SiLU-and-mul quantizing its rows) when its
  down_proj is an Fp8Linear.
The swapped modules hand `Fp8Rows` to the linear instead of a 16-bit tensor: one launch instead of
two, and the same e4m3 bits and scales (kernels.rmsnorm_fp8, kernels.silu_mul_fp8).

Rules:
- Only where the produced rows have that one consumer, so no module ever sees Fp8Rows it cannot
  take: the decoder layer of exactly `DecoderLayer` (not Gemma's or DeepSeek-V2's subclasses;
  Phi-3 builds its own layers), attention and MLP of exactly the types above, linears of exactly
  `Fp8Linear`. The tensor-parallel `Fp8RowParallelLinear` (a subclass) is left alone: it quantizes
  each row with the amax of the whole row across ranks, which one rank's kernel cannot see. MoE
  blocks are not TritonGatedMLPs, so their layers keep an unfused post-attention norm.
- Replacements hold the original Parameters under the same names (as fast_path's do); a second
  pass changes nothing. Returns the number of modules replaced.
- The kernels are called through their torch custom ops (kernels.custom_ops): torch.compile and
  CUDA graphs see one opaque call each.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.kernels.custom_ops import fused_add_rmsnorm_fp8_op, rmsnorm_fp8_op, silu_mul_fp8_op
from pdserve.shared.models.fast_path import RopeFusedAttention, TritonGatedMLP, TritonRMSNorm
from pdserve.shared.models.fp8_linear import Fp8Linear, Fp8Rows
from pdserve.shared.models.llama import Attention, DecoderLayer


class Fp8InputRMSNorm(TritonRMSNorm):
    """A TritonRMSNorm whose normed rows come out as Fp8Rows; `forward(x, residual)` writes
    x + residual into residual (x itself is left as it was)."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> Fp8Rows | tuple[Fp8Rows, torch.Tensor]:
        if residual is None:
            return Fp8Rows(*rmsnorm_fp8_op(x, self.weight, self.eps))
        return Fp8Rows(*fused_add_rmsnorm_fp8_op(x, residual, self.weight, self.eps)), residual


class Fp8InputGatedMLP(TritonGatedMLP):
    """down(silu_mul_fp8(gate_up(x))): the down projection gets its rows quantized; x may be Fp8Rows."""

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:  # type: ignore[override]
        gate_up = self.gate_up_proj(x)
        rows = Fp8Rows(*silu_mul_fp8_op(gate_up.reshape(-1, gate_up.shape[-1])))
        return self.down_proj(rows).reshape(*x.shape[:-1], self.down_proj.out_features)


def _is_fp8_linear(module: nn.Module) -> bool:
    return type(module) is Fp8Linear


def _layer_swaps(layer: DecoderLayer) -> list[tuple[str, nn.Module]]:
    swaps: list[tuple[str, nn.Module]] = []
    attn, mlp = layer.self_attn, layer.mlp
    if (
        type(layer.input_layernorm) is TritonRMSNorm
        and type(attn) in (Attention, RopeFusedAttention)
        and _is_fp8_linear(attn.qkv_proj)
    ):
        swaps.append(("input_layernorm", Fp8InputRMSNorm(layer.input_layernorm)))
    if type(mlp) is not TritonGatedMLP:
        return swaps
    if type(layer.post_attention_layernorm) is TritonRMSNorm and _is_fp8_linear(mlp.gate_up_proj):
        swaps.append(("post_attention_layernorm", Fp8InputRMSNorm(layer.post_attention_layernorm)))
    if _is_fp8_linear(mlp.down_proj):
        swaps.append(("mlp", Fp8InputGatedMLP(mlp)))
    return swaps


def fuse_fp8_inputs(model: nn.Module) -> int:
    """Swaps in the norms and MLPs that hand Fp8Rows to their Fp8Linear (see the module rules)."""
    swaps = [
        (layer, name, new)
        for layer in model.modules()
        if type(layer) is DecoderLayer
        for name, new in _layer_swaps(layer)
    ]
    # Collected first, applied after: replacing children while walking modules() would revisit them.
    for layer, name, new in swaps:
        setattr(layer, name, new)
    return len(swaps)
