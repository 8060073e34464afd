"""The reference an fp8 model is checked against: the same model in float32 with fake-quantized
linears. Each converted linear keeps float32 weights equal to its fp8 weight times its scale, and
rounds its input through the per-token fp8 quantizer before a plain float32 matmul, so it computes
what the fp8 GEMM computes up to the order of the float32 sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels.fp8_quant import per_channel_quant_fp8, per_token_quant_fp8_ref
from pdserve.shared.models.fp8_linear import _convertible, _replace


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = per_channel_quant_fp8(linear.weight.data)
        self.weight = nn.Parameter(weight.float() * scale[:, None], requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scales = per_token_quant_fp8_ref(x.reshape(-1, x.shape[-1]))
        rows = (q.float() * scales).reshape(x.shape)
        return F.linear(rows, self.weight, self.bias)


@torch.no_grad()
def fake_quantize_linears(model: nn.Module) -> int:
    """Replaces the linears `quantize_linears` would convert by FakeQuantLinears; returns how many."""
    found = _convertible(model, lambda name: False)
    for name, linear in found:
        _replace(model, name, FakeQuantLinear(linear))
    return len(found)
