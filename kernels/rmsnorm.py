"""RMSNorm and residual-add + RMSNorm, with exactly the numerics of shared.models.layers.RMSNorm.

Rules:
- Per row of `hidden` elements: x32 = x.float(); normed = x32 * rsqrt(mean(x32 ** 2) + eps);
  out = weight * normed.to(x.dtype), the product rounded to x's dtype (so two roundings in 16-bit
  dtypes, like the module). `weight` is `[hidden]`, contiguous, in x's dtype.
- `rmsnorm(x)`: x is `[T, hidden]` or `[T, H, hidden]` (Qwen3 normalizes each head of a q/k view),
  any strides with a contiguous last dim. It returns a new contiguous tensor, or writes `out`.
- `fused_add_rmsnorm(x, residual)`: s = x + residual rounded to x's dtype (as torch adds), returns
  (norm(s), s) and works IN PLACE: s is written into `residual`, norm(s) into `x`, and the two
  returned tensors are those buffers. x and residual are `[T, hidden]` with a contiguous last dim
  and must not overlap. Each row is read whole before it is written, so in place is safe.
- One program per row holds the row in registers: hidden up to 65536 (non powers of two fine).
- Launches on the current CUDA device; CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HIDDEN = 65536


@triton.jit
def load_row_adding_residual(x, residual, row, x_stride, r_stride, cols, mask, ADD_RESIDUAL: tl.constexpr):
    """x's row in x's dtype; with ADD_RESIDUAL, x + residual instead, rounded to the dtype before
    anything normalizes it (as torch's `x + residual` is) and written into residual's row."""
    xv = tl.load(x + row * x_stride + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r_row = residual + row * r_stride + cols
        rv = tl.load(r_row, mask=mask, other=0.0)
        xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(x.dtype.element_ty)
        tl.store(r_row, xv, mask=mask)
    return xv


@triton.jit
def inverse_rms(x32, hidden, eps):
    """1 / sqrt(mean(x32^2) + eps) of a row held whole in float32 (lanes past `hidden` 0)."""
    return tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + tl.cast(eps, tl.float32))


@triton.jit
def _rmsnorm_kernel(
    x,
    out,
    weight,
    inner_rows,
    x_stride0,
    x_stride1,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    outer = (row // inner_rows).to(tl.int64)
    inner = (row % inner_rows).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x32 = tl.load(x + outer * x_stride0 + inner * x_stride1 + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (x32 * inverse_rms(x32, hidden, eps)).to(out.dtype.element_ty)
    w = tl.load(weight + cols, mask=mask)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + row.to(tl.int64) * hidden + cols, y, mask=mask)


@triton.jit
def _fused_add_rmsnorm_kernel(
    x,
    residual,
    weight,
    x_stride,
    r_stride,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    s32 = load_row_adding_residual(x, residual, row, x_stride, r_stride, cols, mask, True).to(tl.float32)
    normed = (s32 * inverse_rms(s32, hidden, eps)).to(x.dtype.element_ty)
    w = tl.load(weight + cols, mask=mask)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype.element_ty)
    tl.store(x + row * x_stride + cols, y, mask=mask)


def _launch_params(hidden: int) -> tuple[int, int]:
    assert 0 < hidden <= _MAX_HIDDEN, f"hidden {hidden} outside (0, {_MAX_HIDDEN}]"
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous(), (weight.shape, hidden)
    assert weight.dtype == x.dtype and x.dtype in _DTYPES, (weight.dtype, x.dtype)
    assert weight.device == x.device, (weight.device, x.device)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of each row of x `[T, hidden]` or `[T, H, hidden]`; returns `out` (new if None)."""
    assert x.ndim in (2, 3), f"x must be [T, hidden] or [T, H, hidden]: {tuple(x.shape)}"
    assert x.stride(-1) == 1, "x needs a contiguous last dim"
    _check_weight(weight, x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    assert out.device == x.device
    inner, stride1 = (x.shape[1], x.stride(1)) if x.ndim == 3 else (1, 0)
    rows = x.shape[0] * inner
    if rows == 0:
        return out
    block, num_warps = _launch_params(x.shape[-1])
    _rmsnorm_kernel[(rows,)](
        x, out, weight, inner, x.stride(0), stride1, x.shape[-1], eps, BLOCK=block, num_warps=num_warps
    )
    return out


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), written in place into (x, residual): see the rules."""
    assert x.ndim == 2 and x.shape == residual.shape, (x.shape, residual.shape)
    assert x.stride(-1) == 1 and residual.stride(-1) == 1, "x and residual need a contiguous last dim"
    assert residual.dtype == x.dtype and residual.device == x.device, (residual.dtype, x.dtype)
    assert x is not residual, "x and residual must not overlap"
    _check_weight(weight, x)
    if x.shape[0] == 0:
        return x, residual
    block, num_warps = _launch_params(x.shape[-1])
    _fused_add_rmsnorm_kernel[(x.shape[0],)](
        x,
        residual,
        weight,
        x.stride(0),
        residual.stride(0),
        x.shape[-1],
        eps,
        BLOCK=block,
        num_warps=num_warps,
    )
    return x, residual


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle, written out in torch: two roundings in 16-bit dtypes."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of `fused_add_rmsnorm`, out of place."""
    summed = x + residual
    return rmsnorm_ref(summed, weight, eps), summed
