"""fp8 MoE experts: stacked e4m3 expert weights with per-expert, per-output-row scales.

Rules:
- `Fp8MoEExperts` holds `w13` [E, 2I, H] and `w2` [E, H, I] as float8_e4m3fn with `w13_scale`
  [E, 2I] and `w2_scale` [E, H] float32 (the gate rows' scales, then the up rows'). Its forward is
  kernels.fused_moe with those scales: on CUDA the fused kernel (input rows quantized per row inside
  it, no calibration), elsewhere `fused_moe_ref`, the same arithmetic in torch.
- Checkpoint names are MoEExperts' plus each expert linear's `weight_scale` (per output channel or
  per tensor; the loader broadcasts a per-tensor scale over the shard's rows), so fp8 checkpoints
  with per-expert `weight_scale`s load as published.
- `quantize_experts(model, keep)` converts, in place, every MoEExperts from its loaded weights;
  `fp8_experts_for_checkpoint(model, keep)` swaps in empty Fp8MoEExperts before an fp8 checkpoint
  is loaded into them. Experts the checkpoint kept in its own dtype (`keep(name)` true for their
  per-expert linears) stay MoEExperts; a layer kept in part is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.kernels.fp8_quant import per_channel_quant_fp8
from pdserve.kernels.fused_moe import fused_moe_ref
from pdserve.shared.models.fp8_linear import replace_each
from pdserve.shared.models.moe_block import MoEExperts
from pdserve.shared.models.weights import Target


class Fp8MoEExperts(MoEExperts):
    """MoEExperts with fp8 weights and per-row scales (see the module rules)."""

    takes_gated_shared = True

    def __init__(self, experts: MoEExperts):
        nn.Module.__init__(self)  # not MoEExperts.__init__: the weights are made here in fp8
        self.num_experts = experts.num_experts
        self.intermediate_size = experts.intermediate_size
        self.names = experts.names
        e, two_i, h = experts.w13.shape
        with torch.device(experts.w13.device):
            self.w13 = nn.Parameter(torch.empty(e, two_i, h, dtype=torch.float8_e4m3fn), requires_grad=False)
            self.w2 = nn.Parameter(
                torch.empty(e, h, two_i // 2, dtype=torch.float8_e4m3fn), requires_grad=False
            )
            self.w13_scale = nn.Parameter(torch.ones(e, two_i, dtype=torch.float32), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.ones(e, h, dtype=torch.float32), requires_grad=False)

    @staticmethod
    @torch.no_grad()
    def quantized(experts: MoEExperts) -> Fp8MoEExperts:
        fp8 = Fp8MoEExperts(experts)
        for weight, scale, source in (
            (fp8.w13, fp8.w13_scale, experts.w13),
            (fp8.w2, fp8.w2_scale, experts.w2),
        ):
            for e in range(fp8.num_experts):  # one expert at a time: peak memory of one float32 copy
                weight.data[e], scale.data[e] = per_channel_quant_fp8(source.data[e])
        return fp8

    def expert_targets(self, prefix: str) -> dict[str, Target]:
        targets = super().expert_targets(prefix)
        gate, up, down = self.names
        size = self.intermediate_size
        for e in range(self.num_experts):
            targets[f"{prefix}.{e}.{gate}.weight_scale"] = (self.w13_scale, (e, slice(0, size)))
            targets[f"{prefix}.{e}.{up}.weight_scale"] = (self.w13_scale, (e, slice(size, 2 * size)))
            targets[f"{prefix}.{e}.{down}.weight_scale"] = (self.w2_scale, e)
        return targets

    def forward(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared: torch.Tensor | None = None,
        shared_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As TritonMoEExperts.forward, with fp8 experts (the torch reference off CUDA)."""
        weights = topk_weights.float()
        if hidden.device.type == "cuda":
            from pdserve.kernels.custom_ops import fused_moe_fp8_op

            return fused_moe_fp8_op(
                hidden,
                self.w13,
                self.w13_scale,
                self.w2,
                self.w2_scale,
                weights,
                topk_ids,
                0,
                shared,
                shared_gate,
            )
        return fused_moe_ref(
            hidden, self.w13, self.w2, weights, topk_ids, w13_scale=self.w13_scale, w2_scale=self.w2_scale,
            shared=shared, shared_gate=shared_gate,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, fp8 e4m3 per-channel"


def convertible_experts(model: nn.Module, keep: Callable[[str], bool]) -> list[tuple[str, MoEExperts]]:
    """The MoEExperts (exactly that type) of `model` that the checkpoint did not keep in its dtype."""
    found = []
    for name, module in model.named_modules():
        if type(module) is not MoEExperts:
            continue
        names = [f"{name}.{e}.{linear}" for e in range(module.num_experts) for linear in module.names]
        kept = [n for n in names if keep(n)]
        if kept and len(kept) != len(names):
            raise ValueError(f"the checkpoint keeps {kept[:3]}... unquantized but not the rest of {name}")
        if not kept:
            found.append((name, module))
    return found


def quantize_experts(model: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> int:
    """Converts the MoE layers' experts to fp8 from their weights, layer by layer; returns how many."""
    return replace_each(model, convertible_experts(model, keep), Fp8MoEExperts.quantized)


def fp8_experts_for_checkpoint(model: nn.Module, keep: Callable[[str], bool]) -> int:
    """Swaps empty Fp8MoEExperts in where an fp8 checkpoint holds fp8 experts; returns how many."""
    return replace_each(model, convertible_experts(model, keep), Fp8MoEExperts)
