"""fp8 KV cache values: how K and V are quantized into a float8 pool and read back.

Rules (every writer and reader of an fp8 pool follows them; `quantize_kv_ref` and
`dequantize_kv_ref` are the oracle):
- A pool of float8_e4m3fn or float8_e5m2 has one float32 scale per layer for K and one for V.
  Stored value = round_to_fp8(x / scale) (float32, an IEEE division) clamped to the format's
  largest finite value first (e4m3 448, e5m2 57344), rounded to nearest even.
- Read value = stored * scale in float32. The attention kernels fold the K scale into the score
  scale and the V scale into the output (the same products, associated differently).
- In Triton, `quantize_to_fp8` rounds to the format's grid itself before converting: the
  interpreter rounds a mantissa that carries into the exponent wrong (kernels.fp8_quant), so a
  kernel converts only values the format holds exactly. `div_rn` keeps CUDA's float32 division
  exact, as torch's.
- Scales reach the kernels as one-element float32 tensors (views of the pool's `kv_scales`): a
  CUDA graph replays their addresses, so a scale set after capture still counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8_quant import round_to_e4m3

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_KV_DTYPES


@triton.jit
def round_to_e5m2(y):
    """y (float32, |y| <= 57344) rounded to nearest even on e5m2's grid, still as float32."""
    bits = y.to(tl.int32, bitcast=True)
    # normal range: keep 2 mantissa bits, round half to even, a carry moves into the exponent
    bits = (bits + ((bits >> 21) & 1) + 0xFFFFF) & -2097152  # -2097152 == 0xFFE00000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals (below 2**-14) sit on a grid of 2**-16 (see round_to_e4m3)
    subnormal = ((y * 65536.0 + 12582912.0) - 12582912.0) / 65536.0
    subnormal = tl.where(subnormal == 0.0, y * 0.0, subnormal)
    return tl.where(tl.abs(y) < 0.00006103515625, subnormal, normal)


@triton.jit
def quantize_to_fp8(x, scale, FP8_MAX_C: tl.constexpr, E5M2: tl.constexpr):
    """x / scale clamped and rounded to the fp8 grid (float32); the caller converts it."""
    y = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX_C, FP8_MAX_C)
    if E5M2:
        return round_to_e5m2(y)
    return round_to_e4m3(y)


def fp8_store_args(cache_dtype: torch.dtype) -> dict[str, object]:
    """The constexprs a storing kernel takes for a cache of this dtype (FP8_MAX_C 0: no fp8)."""
    return {"FP8_MAX_C": FP8_MAX.get(cache_dtype, 0.0), "E5M2": cache_dtype == torch.float8_e5m2}


def check_scales(
    cache_dtype: torch.dtype, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, device: torch.device
) -> None:
    """An fp8 cache has both scales (one float32 element each, on the cache's device); others none."""
    if not is_fp8(cache_dtype):
        assert k_scale is None and v_scale is None, f"scales given for a {cache_dtype} cache"
        return
    for scale in (k_scale, v_scale):
        assert scale is not None, f"a {cache_dtype} cache needs k_scale and v_scale"
        assert scale.numel() == 1 and scale.dtype == torch.float32, (scale.shape, scale.dtype)
        assert scale.device == device, "the scales must be on the cache's device"


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x in the pool's dtype: scaled, clamped and rounded for an fp8 pool, cast for any other."""
    if not is_fp8(dtype):
        return x.to(dtype)
    assert scale is not None, f"a {dtype} pool needs a scale"
    limit = FP8_MAX[dtype]
    return (x.float() / scale.float()).clamp(-limit, limit).to(dtype)


def dequantize_kv_ref(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored values as float32: times the scale for an fp8 pool (scale given), else as they are."""
    if scale is None:
        return stored.float()
    return stored.float() * scale.float()
