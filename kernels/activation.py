"""SiLU-and-multiply of a merged gate/up projection, with the numerics of shared.models.layers.GatedMLP.

Rules:
- x `[T, 2I]` (gate columns first, then up) -> `[T, I]` = silu(gate) * up, as torch does it in x's
  dtype: silu computed in float32 and rounded to the dtype, then the product computed in float32
  from the rounded values and rounded again (two roundings in 16-bit dtypes).
- x may have any row stride; its last dim must be contiguous. The output is a new contiguous
  tensor, or `out` (contiguous `[T, I]`, x's dtype).
- One program per (row, block of 1024 columns); a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x, out, x_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * x_stride + inter + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + row * inter + cols, y, mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x `[T, 2I]`; returns `out` (new if None)."""
    return launch_gated(_silu_and_mul_kernel, x, out)


def launch_gated(kernel, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Checks x `[T, 2I]` and out, then launches a gated-activation kernel of this file's signature
    (x, out, x_stride, inter, BLOCK) on one program per (row, block of columns); returns out."""
    assert x.ndim == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2I]: {tuple(x.shape)}"
    assert x.stride(1) == 1, "x needs a contiguous last dim"
    assert x.dtype in _DTYPES, x.dtype
    tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((tokens, inter), dtype=x.dtype, device=x.device)
    assert out.shape == (tokens, inter) and out.dtype == x.dtype and out.is_contiguous(), (
        out.shape,
        out.dtype,
    )
    assert out.device == x.device
    if tokens == 0 or inter == 0:
        return out
    kernel[(tokens, triton.cdiv(inter, _BLOCK))](x, out, x.stride(0), inter, BLOCK=_BLOCK)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The oracle: torch's own silu and multiply, in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
