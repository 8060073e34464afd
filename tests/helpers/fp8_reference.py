"""The reference an fp8 model is checked against: the same model in float32 with fake-quantized
linears and MoE experts. Each converted linear keeps float32 weights equal to its fp8 weight times its scale, and
rounds its input through the per-token fp8 quantizer before a plain float32 matmul, so it computes
what the fp8 GEMM computes up to the order of the float32 sums; FakeQuantMoEExperts does the same
per expert, for fp8 experts (the torch loop of MoEExperts, so the order of the sums differs from
fused_moe_ref's too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels.fp8_quant import per_channel_quant_fp8, per_token_quant_fp8_ref
from pdserve.shared.models.fp8_linear import convertible_linears, replace_each
from pdserve.shared.models.fp8_moe import Fp8MoEExperts, convertible_experts
from pdserve.shared.models.moe_block import MoEExperts


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = per_channel_quant_fp8(linear.weight.data)
        self.weight = nn.Parameter(weight.float() * scale[:, None], requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _fake_quant_rows(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return F.linear(rows, self.weight, self.bias)


@torch.no_grad()
def fake_quantize_linears(model: nn.Module) -> int:
    """Replaces the linears `quantize_linears` would convert by FakeQuantLinears; returns how many."""
    return replace_each(model, convertible_linears(model, lambda name: False), FakeQuantLinear)


class FakeQuantMoEExperts(MoEExperts):
    """MoEExperts in float32 with weights equal to their fp8 values times their scales, and each
    expert's inputs (the layer's rows, then the SiLU-and-mul rows) rounded through the per-token
    quantizer before a plain float32 matmul."""

    def __init__(self, experts: MoEExperts):
        nn.Module.__init__(self)
        fp8 = Fp8MoEExperts.quantized(experts)
        self.num_experts, self.intermediate_size, self.names = (
            fp8.num_experts,
            fp8.intermediate_size,
            fp8.names,
        )
        self.w13 = nn.Parameter(fp8.w13.float() * fp8.w13_scale[..., None], requires_grad=False)
        self.w2 = nn.Parameter(fp8.w2.float() * fp8.w2_scale[..., None], requires_grad=False)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(_fake_quant_rows(x), self.w13[e]).chunk(2, dim=-1)
        return F.linear(_fake_quant_rows(F.silu(gate) * up), self.w2[e])


def _fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    q, scales = per_token_quant_fp8_ref(x)
    return q.float() * scales


@torch.no_grad()
def fake_quantize_experts(model: nn.Module) -> int:
    """Replaces the MoEExperts `quantize_experts` would convert by FakeQuantMoEExperts; returns how many."""
    return replace_each(model, convertible_experts(model, lambda name: False), FakeQuantMoEExperts)
