"""Writing the new tokens' K and V into one layer of the paged KV pool, in one launch.

Rules:
- `k_cache` and `v_cache` are one layer's `[num_pages, page_size, kv_heads, head_dim]`, contiguous,
  same dtype and device (`PagedKVPool.k_buffers[l]` / `v_buffers[l]`, views of the pool's `kv`).
- `slots` `[T]` (int64, or int32) holds flat slots `page * page_size + offset`. Values are not
  checked: that would need a host sync. Padded rows point into page 0, which is never handed out.
  Slots must be distinct (as a batch's are); a repeated slot keeps an unspecified one of its rows.
- `k` and `v` `[T, kv_heads, head_dim]` may be strided views (slices of a fused qkv output); the
  last dim must have stride 1. They are cast to the cache dtype (round to nearest, as `Tensor.to`).
- An fp8 cache (float8_e4m3fn / float8_e5m2) needs `k_scale` and `v_scale` (one-element float32
  tensors): values are stored as kernels.fp8_kv quantizes them, bit for bit as `quantize_kv_ref`.
- One program per (token, block of heads) writes K and V both. The grid depends on shapes only and
  nothing syncs with the host, so the launch can be captured in a CUDA graph.
- It launches on the current CUDA device (the model runner's); under TRITON_INTERPRET=1 it runs on
  CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8_kv import fp8_store_args, quantize_to_fp8
from pdserve.kernels.fp8_kv_format import FP8_KV_DTYPES, check_scales, quantize_kv_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_DTYPES = _DTYPES + FP8_KV_DTYPES


@triton.jit
def _store_kv_kernel(
    k_cache,
    v_cache,
    slots,
    k,
    v,
    k_scale,
    v_scale,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    num_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8_MAX_C: tl.constexpr,  # 0: no fp8 (the scales are placeholders, never read)
    E5M2: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < head_dim)
    # int64 before multiplying: a large pool has more than 2**31 elements per layer.
    slot = tl.load(slots + token).to(tl.int64)
    dst = slot * num_heads * head_dim + heads[:, None] * head_dim + dims[None, :]
    k_src = k + token * k_stride_t + heads[:, None] * k_stride_h + dims[None, :]
    v_src = v + token * v_stride_t + heads[:, None] * v_stride_h + dims[None, :]
    k_val = tl.load(k_src, mask=mask)
    v_val = tl.load(v_src, mask=mask)
    if FP8_MAX_C > 0:
        k_val = quantize_to_fp8(k_val, tl.load(k_scale), FP8_MAX_C, E5M2, SOFT_ROUND)
        v_val = quantize_to_fp8(v_val, tl.load(v_scale), FP8_MAX_C, E5M2, SOFT_ROUND)
    tl.store(k_cache + dst, k_val.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + dst, v_val.to(v_cache.dtype.element_ty), mask=mask)


def check_store_args(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """The launcher checks of a store of k/v into the caches at slots (see the rules); returns (T, Hkv, D)."""
    assert k_cache.ndim == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _CACHE_DTYPES, (k_cache.dtype, v_cache.dtype)
    check_scales(k_cache.dtype, k_scale, v_scale, k_cache.device)
    _, _, num_heads, head_dim = k_cache.shape
    tokens = slots.shape[0]
    assert slots.ndim == 1 and slots.dtype in (torch.int64, torch.int32), (slots.shape, slots.dtype)
    assert k.shape == v.shape == (tokens, num_heads, head_dim), (k.shape, v.shape, tokens)
    assert k.dtype in _DTYPES and v.dtype in _DTYPES, (k.dtype, v.dtype)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v need a contiguous last dim"
    assert slots.stride(0) == 1 or tokens <= 1, "slots must be contiguous"
    device = k_cache.device
    assert v_cache.device == slots.device == k.device == v.device == device, "tensors on different devices"
    return tokens, num_heads, head_dim


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Writes k/v `[T, kv_heads, head_dim]` into `k_cache`/`v_cache` at flat `slots` `[T]` (see the rules)."""
    tokens, num_heads, head_dim = check_store_args(k_cache, v_cache, slots, k, v, k_scale, v_scale)
    if tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    grid = (tokens, triton.cdiv(num_heads, block_h))
    _store_kv_kernel[grid](
        k_cache,
        v_cache,
        slots,
        k,
        v,
        k_scale if k_scale is not None else slots,
        v_scale if v_scale is not None else slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        num_heads,
        head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        **fp8_store_args(k_cache.dtype),
    )


def store_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """The oracle: the same writes with torch indexing."""
    num_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_heads, head_dim)[slots.long()] = quantize_kv_ref(k, k_scale, k_cache.dtype)
    v_cache.view(-1, num_heads, head_dim)[slots.long()] = quantize_kv_ref(v, v_scale, v_cache.dtype)
