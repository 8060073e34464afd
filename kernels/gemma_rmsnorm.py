"""Gemma's RMSNorm (scale 1 + weight) and its residual-add form, with the numerics of
shared.models.gemma.GemmaRMSNorm.

Rules:
- Per row of `hidden` elements: x32 = x.float(); out = (x32 * rsqrt(mean(x32 ** 2) + eps)) *
  (1 + weight.float()), all in float32 and rounded once to x's dtype (kernels.rmsnorm rounds twice:
  Llama's module applies its weight in the input dtype, Gemma's in float32). `weight` is
  `[hidden]`, contiguous, in x's dtype.
- `gemma_rmsnorm(x)`: x is `[T, hidden]` with any row stride and a contiguous last dim. It returns
  a new contiguous tensor, or writes `out`.
- `gemma_fused_add_rmsnorm(x, residual)`: s = x + residual rounded to x's dtype (the module's
  `x + residual`), returns (norm(s), s) IN PLACE: s is written into `residual`, norm(s) into `x`,
  and the two returned tensors are those buffers. x and residual are `[T, hidden]` with a
  contiguous last dim and must not overlap. Each row is read whole before it is written.
- One program per row holds the row in registers: hidden up to 65536 (non powers of two fine).
- Launches on the current CUDA device; CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.rmsnorm import _check_weight, _launch_params


@triton.jit
def _gemma_normed(x32, weight, cols, mask, hidden, eps):
    """The float32 normed row times (1 + weight), multiplied in the module's order."""
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + tl.cast(eps, tl.float32))
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    return (x32 * inv_rms) * (1.0 + w)


@triton.jit
def _gemma_rmsnorm_kernel(x, out, weight, x_stride, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x32 = tl.load(x + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = _gemma_normed(x32, weight, cols, mask, hidden, eps)
    tl.store(out + row * hidden + cols, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gemma_fused_add_rmsnorm_kernel(
    x, residual, weight, x_stride, r_stride, hidden, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x_row = x + row * x_stride + cols
    r_row = residual + row * r_stride + cols
    xv = tl.load(x_row, mask=mask, other=0.0)
    rv = tl.load(r_row, mask=mask, other=0.0)
    # Rounded to the dtype before normalizing, as torch's `x + residual` is.
    summed = (xv.to(tl.float32) + rv.to(tl.float32)).to(x.dtype.element_ty)
    tl.store(r_row, summed, mask=mask)
    y = _gemma_normed(summed.to(tl.float32), weight, cols, mask, hidden, eps)
    tl.store(x_row, y.to(x.dtype.element_ty), mask=mask)


def gemma_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gemma's RMSNorm of each row of x `[T, hidden]`; returns `out` (new if None)."""
    assert x.ndim == 2, f"x must be [T, hidden]: {tuple(x.shape)}"
    assert x.stride(-1) == 1, "x needs a contiguous last dim"
    _check_weight(weight, x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    assert out.device == x.device
    if x.shape[0] == 0:
        return out
    block, num_warps = _launch_params(x.shape[-1])
    _gemma_rmsnorm_kernel[(x.shape[0],)](
        x, out, weight, x.stride(0), x.shape[-1], eps, BLOCK=block, num_warps=num_warps
    )
    return out


def gemma_fused_add_rmsnorm(
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
    _gemma_fused_add_rmsnorm_kernel[(x.shape[0],)](
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


def gemma_rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The oracle, written out in torch: float32 throughout, one rounding."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(x.dtype)


def gemma_fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of `gemma_fused_add_rmsnorm`, out of place."""
    summed = x + residual
    return gemma_rmsnorm_ref(summed, weight, eps), summed
