"""The fp8 KV formats in plain torch: which dtypes, their range, and the oracle of a store and a read.

Torch only, so that a CPU process (the pool's torch path) never loads Triton; the rules are those of
kernels.fp8_kv, whose Triton helpers must reproduce `quantize_kv_ref` bit for bit.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_KV_DTYPES


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
