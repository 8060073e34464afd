"""The fast-path pass: swaps the Triton kernels of pdserve.kernels into a built Llama-family model.

`use_triton_kernels(model)` replaces, in place:
- every RMSNorm (the decoder layers' two norms, the final norm, Qwen3's per-head q/k norms) by a
  `TritonRMSNorm` (both forms: plain, and residual-add + norm);
- every GatedMLP by a `TritonGatedMLP`: the same two projections, `silu_and_mul` between them;
- Gemma's: every GemmaRMSNorm by a `TritonGemmaRMSNorm` (the (1 + weight) kernels of
  kernels.gemma_rmsnorm, both forms) and every GeluGatedMLP by a `TritonGeluGatedMLP`
  (`gelu_and_mul` between the projections);
- every MoEExperts (the MoE families' stacked experts) by a `TritonMoEExperts`: one fused-MoE
  launch pair over the selected experts instead of a loop over them (and, inside a CUDA graph,
  instead of running every expert);
- every SparseMoeBlock (exactly that type, of at most 256 experts and top-8) by a
  `TritonSparseMoeBlock` (shared.models.fast_moe): routing in one launch, Qwen2-MoE's
  shared-expert gate merged into the router's GEMM and its tail in one launch;
- in every DecoderModel, `rotary_emb` by a `TritonRotaryEmbedding` and each layer's `self_attn`
  by a `RopeFusedAttention` (same projections and norms, its `rotary` a `TritonApplyRotary`). They
  are swapped together: the new embedding hands over positions and inv_freq instead of cos/sin,
  and the kernels compute cos/sin. A backend with `attend_rotary` (TritonAttention) rotates q and
  k in the launch that stores K/V; with any other backend the layer rotates them first, then
  calls `attend`. Models whose rope or attention is of another type keep rope + store unfused.

Rules:
- Replacements hold the original Parameters and buffers under the same names: nothing is copied,
  and checkpoint loading, weight updates and `reset_buffers` work the same after the pass.
- Only modules of exactly these torch types are swapped, so a second pass changes nothing and
  unknown subclasses are left alone: a subclass computes something else (Gemma's norms and MLPs
  subclass Llama's), so each needs its own kernels and its own entry here. Replacements subclass
  what they replace, so isinstance checks and class attributes (`neutral_weight`) still hold.
  The return value counts the modules replaced.
- Inference only: the kernels have no backward, and they write in place where their docstrings
  say so (fused_add_rmsnorm into its x and residual, rope into q and k). They are called through
  their torch custom ops (kernels.custom_ops), so torch.compile keeps them as opaque calls.
- The model runner applies it on CUDA; on CPU the kernels run under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from pdserve.kernels.custom_ops import (
    fused_add_rmsnorm_op,
    fused_moe_op,
    gelu_and_mul_op,
    gemma_fused_add_rmsnorm_op,
    gemma_rmsnorm_op,
    rmsnorm_op,
    rotary_op,
    silu_and_mul_op,
)
from pdserve.shared.models.fast_moe import TritonSparseMoeBlock
from pdserve.shared.models.forward_batch import ForwardBatch
from pdserve.shared.models.gemma import GeluGatedMLP, GemmaRMSNorm
from pdserve.shared.models.layers import GatedMLP, RMSNorm
from pdserve.shared.models.llama import ApplyRotary, Attention, DecoderModel
from pdserve.shared.models.moe_block import MoEExperts, SparseMoeBlock
from pdserve.shared.models.rope import RotaryEmbedding


class TritonRMSNorm(RMSNorm):
    """RMSNorm through the Triton kernels; `forward(x, residual)` writes into x and residual."""

    # The kernels, as class attributes: TritonGemmaRMSNorm names Gemma's.
    norm_op: ClassVar[torch._ops.OpOverload] = rmsnorm_op
    fused_add_norm_op: ClassVar[torch._ops.OpOverload] = fused_add_rmsnorm_op

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)  # not RMSNorm.__init__: it would allocate a weight we then drop
        self.weight = norm.weight
        self.eps = norm.eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.norm_op(x, self.weight, self.eps)
        self.fused_add_norm_op(x, residual, self.weight, self.eps)
        return x, residual


class TritonGatedMLP(GatedMLP):
    """down(silu_and_mul(gate_up(x))) over the original projections."""

    activation_op: ClassVar[torch._ops.OpOverload] = silu_and_mul_op  # [T, 2I] -> [T, I]

    def __init__(self, mlp: GatedMLP):
        nn.Module.__init__(self)  # not GatedMLP.__init__: it would allocate both projections
        self.intermediate_size = mlp.intermediate_size
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = self.activation_op(gate_up.reshape(-1, gate_up.shape[-1]))
        return self.down_proj(act.reshape(*x.shape[:-1], self.intermediate_size))


class TritonGemmaRMSNorm(TritonRMSNorm, GemmaRMSNorm):
    """GemmaRMSNorm ((1 + weight), float32, one rounding) through kernels.gemma_rmsnorm; `x` is
    `[T, hidden]`, and `forward(x, residual)` writes into x and residual as TritonRMSNorm's."""

    norm_op = gemma_rmsnorm_op
    fused_add_norm_op = gemma_fused_add_rmsnorm_op


class TritonGeluGatedMLP(TritonGatedMLP, GeluGatedMLP):
    """down(gelu_and_mul(gate_up(x))) over GeluGatedMLP's projections."""

    activation_op = gelu_and_mul_op


class TritonMoEExperts(MoEExperts):
    """The fused-MoE kernel over the original stacked `w13`/`w2` (same layout, nothing copied)."""

    takes_gated_shared = True

    def __init__(self, experts: MoEExperts):
        nn.Module.__init__(self)  # not MoEExperts.__init__: it would allocate the expert weights
        self.num_experts = experts.num_experts
        self.intermediate_size = experts.intermediate_size
        self.names = experts.names
        self.w13 = experts.w13
        self.w2 = experts.w2

    def forward(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared: torch.Tensor | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routed experts' sum; given a shared expert's output and gate logits, plus
        sigmoid(gate) * shared in the same closing launch (shared.models.fast_moe)."""
        return fused_moe_op(hidden, self.w13, self.w2, topk_weights.float(), topk_ids, 0, shared, shared_gate)


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
        rotary_op(q, k, rope.positions, rope.inv_freq, rope.attention_scaling)
        return q, k


class RopeFusedAttention(Attention):
    """Stands in for llama.Attention: q and k go to the backend before rope where it can rotate them
    while storing K/V (`attend_rotary`), one launch instead of two; elsewhere rope, then `attend`."""

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)  # not Attention.__init__: it would allocate the projections
        for name in ("layer_id", "num_heads", "num_kv_heads", "head_dim", "scale", "split_sizes"):
            setattr(self, name, getattr(attn, name))
        self.qkv_proj, self.o_proj = attn.qkv_proj, attn.o_proj
        self.window, self.softcap = attn.window, attn.softcap
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.rotary = TritonApplyRotary()

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, rope: RopeInputs) -> torch.Tensor:
        q, k, v = self.project_qkv(hidden)
        attend_rotary = getattr(batch.attn_backend, "attend_rotary", None)
        if attend_rotary is not None:
            out = attend_rotary(
                self.layer_id, q, k, v, rope, batch, self.scale, window=self.window, softcap=self.softcap
            )
        else:
            q, k = self.rotary(q, k, rope)
            out = batch.attn_backend.attend(
                self.layer_id, q, k, v, batch, self.scale, window=self.window, softcap=self.softcap
            )
        return self.o_proj(out.reshape(hidden.shape[0], self.num_heads * self.head_dim))


def _rope_swappable(decoder: DecoderModel) -> bool:
    return type(decoder.rotary_emb) is RotaryEmbedding and all(
        type(layer.self_attn) is Attention and type(layer.self_attn.rotary) is ApplyRotary
        for layer in decoder.layers
    )


def use_triton_kernels(model: nn.Module) -> int:
    """Swaps the Triton norms, rope, gated activations and fused MoE into `model` (see the module rules).

    Returns the number of modules replaced (0 when the pass already ran).
    """
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is RMSNorm:
                swaps.append((module, name, TritonRMSNorm(child)))
            elif type(child) is GatedMLP:
                swaps.append((module, name, TritonGatedMLP(child)))
            elif type(child) is GemmaRMSNorm:
                swaps.append((module, name, TritonGemmaRMSNorm(child)))
            elif type(child) is GeluGatedMLP:
                swaps.append((module, name, TritonGeluGatedMLP(child)))
            elif type(child) is MoEExperts:
                swaps.append((module, name, TritonMoEExperts(child)))
    # Collected first, applied after: replacing children while walking modules() would revisit them.
    _apply(swaps)
    # MoE blocks second, so that each TritonSparseMoeBlock takes over experts and MLPs already swapped.
    moe_swaps: list[tuple[nn.Module, str, nn.Module]] = [
        (module, name, TritonSparseMoeBlock(child))
        for module in model.modules()
        for name, child in module.named_children()
        if type(child) is SparseMoeBlock and TritonSparseMoeBlock.fits(child)
    ]
    _apply(moe_swaps)
    # Rope second, so that each RopeFusedAttention takes over q/k norms already swapped.
    rope_swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for module in model.modules():
        if isinstance(module, DecoderModel) and _rope_swappable(module):
            rope_swaps.append((module, "rotary_emb", TritonRotaryEmbedding(module.rotary_emb)))
            rope_swaps.extend(
                (layer, "self_attn", RopeFusedAttention(layer.self_attn)) for layer in module.layers
            )
    _apply(rope_swaps)
    return len(swaps) + len(moe_swaps) + len(rope_swaps)


def _apply(swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, replacement in swaps:
        setattr(parent, name, replacement)
