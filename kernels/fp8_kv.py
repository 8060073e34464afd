"""fp8 KV cache values: how K and V are quantized into a float8 pool and read back.

Rules (every writer and reader of an fp8 pool follows them; `quantize_kv_ref` and
`dequantize_kv_ref` in kernels.fp8_kv_format, torch only, are the oracle):
- A pool of float8_e4m3fn or float8_e5m2 has one float32 scale per layer for K and one for V.
  Stored value = round_to_fp8(x / scale) (float32, an IEEE division) clamped to the format's
  largest finite value first (e4m3 448, e5m2 57344), rounded to nearest even.
- Read value = stored * scale in float32. The attention kernels fold the K scale into the score
  scale and the V scale into the output (the same products, associated differently).
- Under Triton's interpreter `quantize_to_fp8` rounds to the format's grid itself before
  converting: the interpreter rounds a mantissa that carries into the exponent wrong
  (kernels.fp8_quant), so a kernel converts only values the format holds exactly. Compiled for a
  GPU the hardware's conversion rounds (to nearest even, the same bits). `div_rn` keeps CUDA's
  float32 division exact, as torch's.
- Scales reach the kernels as one-element float32 tensors (views of the pool's `kv_scales`): a
  CUDA graph replays their addresses, so a scale set after capture still counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8_kv_format import FP8_MAX
from pdserve.kernels.fp8_quant import round_to_e4m3, soft_round


@triton.jit
def round_to_e5m2(y):
    """y (float32, |y| <= 57344) rounded to nearest even on e5m2's grid, still as float32."""
    bits = y.to(tl.int32, bitcast=True)
    # normal range: keep 2 mantissa bits, round half to even, a carry moves into the exponent
    bits = (bits + ((bits >> 21) & 1) + 0xFFFFF) & -2097152  # -2097152 == 0xFFE00000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals (below 2**-14) sit on a grid of 2**-16 (see round_to_e4m3)
    subnormal = ((y * 65536.0 + 12582912.0) - 12582912.0) * 0.0000152587890625  # exact: 2**-16
    subnormal = tl.where(subnormal == 0.0, y * 0.0, subnormal)
    return tl.where(tl.abs(y) < 0.00006103515625, subnormal, normal)


@triton.jit
def quantize_to_fp8(x, scale, FP8_MAX_C: tl.constexpr, E5M2: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """x / scale clamped (float32) and, under the interpreter, rounded to the fp8 grid; the caller
    converts it."""
    y = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX_C, FP8_MAX_C)
    if not SOFT_ROUND:
        return y
    if E5M2:
        return round_to_e5m2(y)
    return round_to_e4m3(y)


def fp8_store_args(cache_dtype: torch.dtype) -> dict[str, object]:
    """The constexprs a storing kernel takes for a cache of this dtype (FP8_MAX_C 0: no fp8)."""
    return {
        "FP8_MAX_C": FP8_MAX.get(cache_dtype, 0.0),
        "E5M2": cache_dtype == torch.float8_e5m2,
        "SOFT_ROUND": soft_round(),
    }
