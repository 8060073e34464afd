"""GeLU(tanh)-and-multiply of a merged gate/up projection, with the numerics of
shared.models.gemma.GeluGatedMLP (`F.gelu(gate, approximate="tanh") * up`).

Rules:
- x `[T, 2I]` (gate columns first, then up) -> `[T, I]` = gelu_tanh(gate) * up, as torch does it in
  x's dtype: gelu as 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) in float32 (torch computes
  16-bit gelu in float32 too, CPU and CUDA) rounded to the dtype, then the product computed in
  float32 from the rounded values and rounded again (two roundings in 16-bit dtypes).
- Agreement with torch: float32 within 1e-6 (tanh comes from exp2, torch's from libm/Sleef).
  16-bit dtypes: the rounded gelu is equal, or one ulp off where its float32 value sits on a
  rounding boundary; the product, rounded again, is then within two ulps (equal for >99.5%).
- x may have any row stride; its last dim must be contiguous. The output is a new contiguous
  tensor, or `out` (contiguous `[T, I]`, x's dtype).
- One program per (row, block of 1024 columns); a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.activation import launch_gated

# constexpr: a compiled kernel may read only constexpr globals
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # torch's kBeta: M_SQRT2 * M_2_SQRTPI * 0.5
_KAPPA = tl.constexpr(0.044715)
_TANH_SATURATES = tl.constexpr(8.664339742)


@triton.jit
def _tanh(y):
    """tanh(y) = sign(y) (1 - 2e / (1 + e)), e = exp(-2|y|): one rounding off 1 where |tanh| nears 1,
    so 1 + tanh(y) for negative y lands where torch's tanh puts it. Exactly +-1 past |y| 8.664339742,
    as torch's vectorized CPU tanh (Sleef) saturates there: gelu of a gate below ~-5.05 is -0, not
    ~-1.5e-7 (CUDA's tanhf keeps 1 - 2^-24 up to |y| ~9.01: a gap of at most 3e-8 |gate|)."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(y))  # 2 log2(e)
    t = tl.where(tl.abs(y) > _TANH_SATURATES, 1.0, 1.0 - 2.0 * e / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def _gelu_and_mul_kernel(x, out, x_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * x_stride + inter + cols, mask=mask, other=0.0)
    # torch's expression and order: x_cube = x*x*x; inner = kBeta * (x + kKappa * x_cube)
    inner = _SQRT_2_OVER_PI * (gate + _KAPPA * (gate * gate * gate))
    act = (0.5 * gate * (1.0 + _tanh(inner))).to(out.dtype.element_ty)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + row * inter + cols, y, mask=mask)


def gelu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_tanh(x[:, :I]) * x[:, I:] for x `[T, 2I]`; returns `out` (new if None)."""
    return launch_gated(_gelu_and_mul_kernel, x, out)


def gelu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """The oracle: torch's own tanh-approximated gelu and multiply, in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
