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

from pdserve.kernels.rmsnorm import _check_weight, _launch_params, inverse_rms, load_row_adding_residual


@triton.jit
def _gemma_rmsnorm_kernel(
    x,
    residual,
    out,
    x_stride,
    r_stride,
    out_stride,
    weight,
    hidden,
    eps,
    ADD_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    xv = load_row_adding_residual(x, residual, row, x_stride, r_stride, cols, mask, ADD_RESIDUAL)
    x32 = xv.to(tl.float32)
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x32 * inverse_rms(x32, hidden, eps)) * (1.0 + w)  # the module's order, all in float32
    tl.store(out + row * out_stride + cols, y.to(out.dtype.element_ty), mask=mask)


def _check_rows(x: torch.Tensor, *buffers: torch.Tensor) -> None:
    """x and the buffers the kernel writes: `[T, hidden]` alike, contiguous last dims, distinct."""
    assert x.ndim == 2, f"x must be [T, hidden]: {tuple(x.shape)}"
    for t in (x, *buffers):
        assert t.shape == x.shape and t.dtype == x.dtype and t.device == x.device, (t.shape, t.dtype)
        assert t.stride(-1) == 1, "x and the buffers need a contiguous last dim"
    assert all(b is not x for b in buffers), "what the kernel writes must not overlap x"


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """One program per row of x; with a residual, the sum goes into it (and the norm into out)."""
    _check_weight(weight, x)
    if x.shape[0] == 0:
        return
    block, num_warps = _launch_params(x.shape[-1])
    r = x if residual is None else residual  # not read without ADD_RESIDUAL
    _gemma_rmsnorm_kernel[(x.shape[0],)](
        x, r, out, x.stride(0), r.stride(0), out.stride(0), weight, x.shape[-1], eps,
        ADD_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip


def gemma_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gemma's RMSNorm of each row of x `[T, hidden]`; returns `out` (new if None)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    _check_rows(x, out)
    assert out.is_contiguous(), "out is written row after row"
    _launch(x, None, out, weight, eps)
    return out


def gemma_fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's (norm(x + residual), x + residual), written into (x, residual): see the rules."""
    _check_rows(x, residual)
    _launch(x, residual, x, weight, eps)  # each row read whole before it is written
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
