"""RMSNorm (plain, or residual-add + RMSNorm) whose output rows come out fp8-quantized per token.

It feeds an fp8 linear (shared.models.fp8_linear) in the launch that computes its input, instead
of storing the 16-bit rows and quantizing them in a launch of their own.

Rules:
- Bit for bit what the unfused path gives: kernels.rmsnorm's output in x's dtype (its numerics,
  block size and warps), then kernels.fp8_quant's per-token quantization of those stored values
  (the row rounded to x's dtype first, then its amax, scale and e4m3 rounding: `store_row_e4m3`).
- `rmsnorm_fp8(x, weight, eps)` and `fused_add_rmsnorm_fp8(x, residual, weight, eps)` return
  (q [T, hidden] float8_e4m3fn, scales [T, 1] float32). The fused form writes s = x + residual
  (rounded to x's dtype) IN PLACE into `residual`, as kernels.rmsnorm does; x is only read (its
  normed rows go to q, not back into x).
- x and residual are `[T, hidden]` with a contiguous last dim, not overlapping; one program per row
  holds the row in registers, hidden up to kernels.rmsnorm's limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8_quant import MIN_AMAX, per_token_quant_fp8_ref, soft_round, store_row_e4m3
from pdserve.kernels.rmsnorm import (
    _check_weight,
    _launch_params,
    fused_add_rmsnorm_ref,
    inverse_rms,
    load_row_adding_residual,
    rmsnorm_ref,
)


@triton.jit
def _rmsnorm_fp8_kernel(
    x,
    residual,
    weight,
    q,
    scales,
    x_stride,
    r_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    MIN_AMAX_C: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    s32 = load_row_adding_residual(x, residual, row, x_stride, r_stride, cols, mask, HAS_RESIDUAL).to(
        tl.float32
    )
    normed = (s32 * inverse_rms(s32, hidden, eps)).to(x.dtype.element_ty)
    w = tl.load(weight + cols, mask=mask, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype.element_ty)
    # the stored 16-bit row is what the unfused path quantizes; masked lanes are 0 (w is)
    store_row_e4m3(y.to(tl.float32), q, scales, row, cols, hidden, MIN_AMAX_C, SOFT_ROUND)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.ndim == 2 and x.stride(-1) == 1, f"x must be [T, hidden], last dim contiguous: {tuple(x.shape)}"
    _check_weight(weight, x)
    tokens, hidden = x.shape
    q = torch.empty((tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((tokens, 1), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return q, scales
    block, num_warps = _launch_params(hidden)
    _rmsnorm_fp8_kernel[(tokens,)](
        x,
        x if residual is None else residual,  # unread without a residual
        weight,
        q,
        scales,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        MIN_AMAX_C=MIN_AMAX,
        SOFT_ROUND=soft_round(),
        BLOCK=block,
        num_warps=num_warps,
    )
    return q, scales


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of RMSNorm(x): see the rules."""
    return _launch(x, None, weight, eps)


def fused_add_rmsnorm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of RMSNorm(x + residual); x + residual is written into residual."""
    assert x.shape == residual.shape and residual.stride(-1) == 1, (x.shape, residual.shape)
    assert residual.dtype == x.dtype and residual.device == x.device, (residual.dtype, x.dtype)
    assert x is not residual, "x and residual must not overlap"
    return _launch(x, residual, weight, eps)


def rmsnorm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the unfused references, one after the other."""
    return per_token_quant_fp8_ref(rmsnorm_ref(x, weight, eps))


def fused_add_rmsnorm_fp8_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle of `fused_add_rmsnorm_fp8`, out of place: (q, scales, x + residual)."""
    normed, summed = fused_add_rmsnorm_ref(x, residual, weight, eps)
    return *per_token_quant_fp8_ref(normed), summed
