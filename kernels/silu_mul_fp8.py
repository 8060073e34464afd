"""SiLU-and-multiply whose output rows come out fp8-quantized per token (the down projection's input).

Rules:
- x `[T, 2I]` (gate columns first, then up; any row stride, contiguous last dim) -> (q [T, I]
  float8_e4m3fn, scales [T, 1] float32), bit for bit what the unfused path gives:
  kernels.activation's silu_and_mul in x's dtype (its two roundings), then kernels.fp8_quant's
  per-token quantization of those values (`store_row_e4m3`).
- Layout: one program per row holding the whole row of I in registers (I up to 32768; 14,336 for
  Llama-3.1-8B). The scale needs the amax of the whole row before any element can be rounded, and
  a row split across programs would need a second launch (or a grid-wide sync) to share it, which
  is the launch this kernel exists to remove. A decode batch has few rows, so few programs, but
  each reads its 2I inputs once and the step is bound by the GEMMs' weight reads, not by this.
- A grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.activation import silu_and_mul_ref
from pdserve.kernels.fp8_quant import MIN_AMAX, per_token_quant_fp8_ref, soft_round, store_row_e4m3

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_INTER = 32768


@triton.jit
def _silu_mul_fp8_kernel(
    x, q, scales, x_stride, inter, MIN_AMAX_C: tl.constexpr, SOFT_ROUND: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * x_stride + inter + cols, mask=mask, other=0.0)
    # kernels.activation's expression: silu rounded to the dtype, then the product rounded again
    act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype.element_ty)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(x.dtype.element_ty)
    # masked lanes: silu(0) * 0
    store_row_e4m3(y.to(tl.float32), q, scales, row, cols, inter, MIN_AMAX_C, SOFT_ROUND)


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of silu(x[:, :I]) * x[:, I:] for x `[T, 2I]`: see the rules."""
    assert x.ndim == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2I]: {tuple(x.shape)}"
    assert x.stride(1) == 1, "x needs a contiguous last dim"
    assert x.dtype in _DTYPES, x.dtype
    tokens, inter = x.shape[0], x.shape[1] // 2
    assert inter <= _MAX_INTER, f"I={inter} exceeds {_MAX_INTER}"
    q = torch.empty((tokens, inter), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((tokens, 1), dtype=torch.float32, device=x.device)
    if tokens == 0 or inter == 0:
        return q, scales
    block = triton.next_power_of_2(inter)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _silu_mul_fp8_kernel[(tokens,)](
        x, q, scales, x.stride(0), inter, MIN_AMAX_C=MIN_AMAX, SOFT_ROUND=soft_round(),
        BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return q, scales


def silu_mul_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the unfused references, one after the other."""
    return per_token_quant_fp8_ref(silu_and_mul_ref(x))
