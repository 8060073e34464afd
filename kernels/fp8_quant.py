"""Dynamic per-token fp8 (e4m3) quantization of activations, the input of every fp8 GEMM.

Rules:
- Per row of x [M, K] (float32/float16/bfloat16, contiguous last dim): amax = max |x| in float32,
  scale = max(amax, MIN_AMAX) * float32(1 / 448) (448 is e4m3's largest finite value),
  q = x * (1 / scale) clamped to [-448, 448] and rounded to float8_e4m3fn (round to nearest
  even). Returns q [M, K] and the float32 scales [M, 1]; q * scale reconstructs x. The reciprocal
  is one IEEE division per row (vLLM's per-token quantization multiplies by it too): a division
  per value costs ~20 instructions, where the kernels that produce quantized rows (rmsnorm_fp8,
  silu_mul_fp8) are otherwise a handful.
- MIN_AMAX keeps an all-zero row (padding rows of a CUDA graph batch) from dividing by zero.
- One program per row holds the row in registers: K up to 32768 (non powers of two fine).
- Under Triton's interpreter the kernel rounds to the e4m3 grid itself (`round_to_e4m3`) and then
  converts a value the format holds exactly: the interpreter rounds a mantissa that carries into
  the exponent wrong (124.0 becomes 64.0, not 128.0), and the CPU tests must see what the GPU
  computes. Compiled for a GPU, the conversion is the hardware's (cvt.rn.satfinite on sm_89+: round
  to nearest even, the same bits) and the software rounding is left out (`soft_round()`).
- `per_token_quant_fp8_ref` is the same arithmetic in torch (the CPU path and the tests' reference).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = 448.0
INV_FP8_E4M3_MAX = 1.0 / 448.0  # the scale is amax times this (in float32)
INV_MAX_C = tl.constexpr(INV_FP8_E4M3_MAX)  # the same, as kernels read it
MIN_AMAX = 1e-12
_MAX_K = 32768


# read once, as triton.jit reads TRITON_INTERPRET when it decorates a kernel: a kernel module
# imported under the interpreter stays interpreted
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def soft_round() -> bool:
    """Whether kernels round to the fp8 grid in software (under the interpreter) before converting."""
    return _INTERPRETED


@triton.jit
def round_to_e4m3(y):
    """y (float32, |y| <= 448) rounded to nearest even on e4m3's grid, still as float32."""
    bits = y.to(tl.int32, bitcast=True)
    # normal range: keep 3 mantissa bits, round half to even, a carry moves into the exponent
    bits = (bits + ((bits >> 20) & 1) + 0x7FFFF) & -1048576  # -1048576 == 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals (below 2**-6) sit on a fixed grid of 2**-9: 1.5 * 2**23 added and taken away rounds
    # y * 512 to an integer, half to even
    subnormal = ((y * 512.0 + 12582912.0) - 12582912.0) / 512.0
    subnormal = tl.where(subnormal == 0.0, y * 0.0, subnormal)  # a tiny negative rounds to -0.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def store_row_e4m3(x32, q, scales, row, cols, width, min_amax, SOFT_ROUND: tl.constexpr):
    """Quantizes a row held whole in float32 (lanes past `width` 0) as the rules say and stores it:
    q's row `row` [width] and scales[row]. Every kernel that produces quantized rows ends here, so
    their bits and scales are this kernel's."""
    amax = tl.maximum(tl.max(tl.abs(x32), axis=0), min_amax)
    # the scale by a multiply (as the reference's tensor * scalar), its reciprocal by an IEEE
    # division (div_rn, as torch's tensor / tensor): Triton's `/` on float32 is approximate on CUDA
    scale = amax * INV_MAX_C
    inv = tl.math.div_rn(1.0, scale)
    y = tl.clamp(x32 * inv, -448.0, 448.0)
    if SOFT_ROUND:
        y = round_to_e4m3(y)
    tl.store(q + row * width + cols, y.to(q.dtype.element_ty), mask=cols < width)
    tl.store(scales + row, scale)


@triton.jit
def _per_token_quant_kernel(
    x, q, scales, x_stride, K, MIN_AMAX_C: tl.constexpr, SOFT_ROUND: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x32 = tl.load(x + row * x_stride + cols, mask=cols < K, other=0.0).to(tl.float32)
    store_row_e4m3(x32, q, scales, row, cols, K, MIN_AMAX_C, SOFT_ROUND)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] float8_e4m3fn, scales [M, 1] float32) for x [M, K]."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("x must be [M, K] with a contiguous last dim")
    M, K = x.shape
    if K > _MAX_K:
        raise ValueError(f"K={K} exceeds {_MAX_K}")
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:
        _per_token_quant_kernel[(M,)](
            x, q, scales, x.stride(0), K, MIN_AMAX_C=MIN_AMAX, SOFT_ROUND=soft_round(),
            BLOCK=triton.next_power_of_2(K),
        )  # fmt: skip
    return q, scales


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    return quant_fp8_by_amax_ref(x32, x32.abs().amax(dim=-1, keepdim=True))


def quant_fp8_by_amax_ref(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] quantized as above with the given per-row amax [M, 1] (a tensor-parallel rank's
    slice of a row takes the whole row's, so it rounds as the unsplit row does)."""
    scales = amax.float().clamp(min=MIN_AMAX) * INV_FP8_E4M3_MAX
    inv = torch.ones_like(scales) / scales
    q = (x.float() * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scales


def per_channel_quant_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] as float8_e4m3fn with one float32 scale per output row [N] (load time only)."""
    q, scales = per_token_quant_fp8_ref(w)
    return q, scales.squeeze(-1)
