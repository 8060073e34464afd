"""Rotary position embedding of q and k in place, cos/sin computed in the kernel (shared.models.rope),
alone (`apply_rotary`) or fused with the store of the rotated k and v into the paged KV pool
(`rotary_store_kv`).

Rules:
- Rotate-half ("neox") layout: for i < D/2, with angle = positions.float() * inv_freq[i] in float32,
  c = cos(angle) * attention_scaling, s = sin(angle) * attention_scaling:
  out[i] = x[i] * c - x[i + D/2] * s and out[i + D/2] = x[i + D/2] * c + x[i] * s, in float32, cast
  back to x's dtype. Every rope type (default, linear, llama3, yarn) only changes `inv_freq` and
  `attention_scaling`, so one kernel serves them all.
- cos/sin of the float32 angle are taken after reducing it by whole turns of 2*pi in float64, and
  angles reach ~1e5 at long positions. Triton 3.9 lowers tl.cos/tl.sin to libdevice's accurate
  cosf/sinf on NVIDIA, but that is a lowering choice: hardware approximations (sin.approx) lose
  accuracy for large arguments. The reduced angle, in [-pi, pi], is rounded back to float32 (an
  error of ~1e-7, like one more rounding of the angle).
- q `[T, Hq, D]`, k `[T, Hkv, D]`: any strides with a contiguous last dim (views of a fused qkv
  output are fine), same dtype. They are rotated IN PLACE and returned. `positions` `[T]` int,
  `inv_freq` `[D/2]` float32 contiguous, all on one device.
- `rotary_store_kv` also writes, as kernels.kv_store does, the rotated k (rounded to k's dtype
  first, exactly as rope then store) and v `[T, Hkv, D]` (strided like k) into `k_cache`/`v_cache`
  `[num_pages, page_size, Hkv, D]` (contiguous, one dtype) at flat `slots` `[T]`, cast to the
  cache dtype; an fp8 cache with `k_scale`/`v_scale`, quantized as kernels.fp8_kv says (the
  rotated k in k's dtype, then quantized: bit for bit as rope, then store_kv_ref). Slot values are not checked (padded rows point into page 0); slots must be
  distinct. Why fused: rope and the store are two latency-bound launches per layer of a decode
  step (bench/RESULTS.md); fused, each token's k is read once and written to both places.
- One program per (token, block of q heads or of kv heads; a kv program also stores its heads of
  k and v); a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.fp8_kv import fp8_store_args, quantize_to_fp8
from pdserve.kernels.kv_store import check_store_args, store_kv_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# 2*pi as a sum of three float32 numbers, so each product with a whole number of turns is exact in
# float64 whatever precision the compiler gives a literal.
_TWO_PI_A = tl.constexpr(6.28125)
_TWO_PI_B = tl.constexpr(0.0019353071693331003)
_TWO_PI_C = tl.constexpr(1.0253376273028358e-11)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _cos_sin(angle):
    a = angle.to(tl.float64)
    turns = tl.floor(a * _INV_TWO_PI + 0.5)
    r = (a - turns * _TWO_PI_A - turns * _TWO_PI_B - turns * _TWO_PI_C).to(tl.float32)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rope_cos_sin(
    positions, inv_freq, attention_scaling, token, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    dims = tl.arange(0, BLOCK_HALF)
    freq = tl.load(inv_freq + dims, mask=dims < HALF, other=0.0)
    angle = tl.load(positions + token).to(tl.float32) * freq
    c, s = _cos_sin(angle)
    scaling = tl.cast(attention_scaling, tl.float32)  # see decode_attention: float args may come as fp64
    return c * scaling, s * scaling


@triton.jit
def _rotate_heads(base, head_stride, heads, num_heads, c, s, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates heads `heads` of one token's vectors at `base` in place; returns the two rotated
    halves (in base's dtype) and their mask."""
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first = base + heads[:, None] * head_stride + dims[None, :]
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    o1 = (x1 * c[None, :] - x2 * s[None, :]).to(base.dtype.element_ty)
    o2 = (x2 * c[None, :] + x1 * s[None, :]).to(base.dtype.element_ty)
    tl.store(first, o1, mask=mask)
    tl.store(first + HALF, o2, mask=mask)
    return o1, o2, mask


@triton.jit
def _rope_kernel(
    q,
    k,
    v,
    k_cache,
    v_cache,
    positions,
    slots,
    inv_freq,
    attention_scaling,
    k_scale,
    v_scale,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    STORE_KV: tl.constexpr,  # False: v, the caches and slots are placeholders, never read
    FP8_MAX_C: tl.constexpr,  # 0: no fp8 cache (the scales are placeholders, never read)
    E5M2: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    c, s = _rope_cos_sin(positions, inv_freq, attention_scaling, token, HALF, BLOCK_HALF)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_HQ)
    if block < q_blocks:
        q_heads = block * BLOCK_HQ + tl.arange(0, BLOCK_HQ)  # own name: a shape unlike the kv branch's
        _rotate_heads(q + token * q_stride_t, q_stride_h, q_heads, num_q_heads, c, s, HALF, BLOCK_HALF)
    else:
        heads = (block - q_blocks) * BLOCK_HKV + tl.arange(0, BLOCK_HKV)
        k1, k2, mask = _rotate_heads(
            k + token * k_stride_t, k_stride_h, heads, num_kv_heads, c, s, HALF, BLOCK_HALF
        )
        if STORE_KV:
            dims = tl.arange(0, BLOCK_HALF)
            # int64 before multiplying: a large pool has more than 2**31 elements per layer.
            slot = tl.load(slots + token).to(tl.int64)
            dst = slot * num_kv_heads * (2 * HALF) + heads[:, None] * (2 * HALF) + dims[None, :]
            v_first = v + token * v_stride_t + heads[:, None] * v_stride_h + dims[None, :]
            v1 = tl.load(v_first, mask=mask)
            v2 = tl.load(v_first + HALF, mask=mask)
            if FP8_MAX_C > 0:
                ks = tl.load(k_scale)
                vs = tl.load(v_scale)
                k1 = quantize_to_fp8(k1, ks, FP8_MAX_C, E5M2, SOFT_ROUND)
                k2 = quantize_to_fp8(k2, ks, FP8_MAX_C, E5M2, SOFT_ROUND)
                v1 = quantize_to_fp8(v1, vs, FP8_MAX_C, E5M2, SOFT_ROUND)
                v2 = quantize_to_fp8(v2, vs, FP8_MAX_C, E5M2, SOFT_ROUND)
            tl.store(k_cache + dst, k1.to(k_cache.dtype.element_ty), mask=mask)
            tl.store(k_cache + dst + HALF, k2.to(k_cache.dtype.element_ty), mask=mask)
            tl.store(v_cache + dst, v1.to(v_cache.dtype.element_ty), mask=mask)
            tl.store(v_cache + dst + HALF, v2.to(v_cache.dtype.element_ty), mask=mask)


def _check_rotary_args(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[int, int, int, int]:
    """Checks q, k, positions and inv_freq (see the rules); returns (T, Hq, Hkv, D)."""
    assert q.ndim == 3 and k.ndim == 3, (q.shape, k.shape)
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (tokens, num_kv_heads, head_dim), (q.shape, k.shape)
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    assert q.dtype == k.dtype and q.dtype in _DTYPES, (q.dtype, k.dtype)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need a contiguous last dim"
    assert positions.shape == (tokens,) and positions.dtype in (torch.int64, torch.int32), positions.shape
    assert positions.stride(0) == 1 or tokens <= 1, "positions must be contiguous"
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
    assert q.device == k.device == positions.device == inv_freq.device, "tensors on different devices"
    return tokens, num_q_heads, num_kv_heads, head_dim


def _launch(
    q, k, v, k_cache, v_cache, positions, slots, inv_freq, attention_scaling, store_kv: bool,
    k_scale=None, v_scale=None,
) -> None:  # fmt: skip
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    block_half = triton.next_power_of_2(head_dim // 2)
    # kv programs sized to the kv heads (a GQA model has a quarter of q's or fewer): padded lanes
    # would still quantize and store under masks
    block_hq = min(triton.next_power_of_2(num_q_heads), max(1, 2048 // block_half))
    block_hkv = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_half))
    grid = (tokens, triton.cdiv(num_q_heads, block_hq) + triton.cdiv(num_kv_heads, block_hkv))
    _rope_kernel[grid](
        q, k, v, k_cache, v_cache, positions, slots, inv_freq, float(attention_scaling),
        k_scale if k_scale is not None else inv_freq, v_scale if v_scale is not None else inv_freq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_q_heads, num_kv_heads,
        HALF=head_dim // 2, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half, STORE_KV=store_kv,
        **fp8_store_args(k_cache.dtype if store_kv else q.dtype),
    )  # fmt: skip


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q `[T, Hq, D]` and k `[T, Hkv, D]` in place by the rope angles of `positions`; returns (q, k)."""
    tokens = _check_rotary_args(q, k, positions, inv_freq)[0]
    if tokens > 0:
        _launch(q, k, k, k, k, positions, positions, inv_freq, attention_scaling, store_kv=False)
    return q, k


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Rotates q and k in place and writes the rotated k and v into the caches at `slots` (see the rules)."""
    tokens = _check_rotary_args(q, k, positions, inv_freq)[0]
    # k, v and slots agree with the caches, on q's device; the scales with the cache dtype
    check_store_args(k_cache, v_cache, slots, k, v, k_scale, v_scale)
    if tokens > 0:
        _launch(
            q, k, v, k_cache, v_cache, positions, slots, inv_freq, attention_scaling, True, k_scale, v_scale
        )


def apply_rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle, out of place: float32 angles, rotate-half, cast back."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = angles.cos() * attention_scaling, angles.sin() * attention_scaling

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """The oracle of rotary_store_kv: the rope oracle written back into q and k, then the store's."""
    q_rot, k_rot = apply_rotary_ref(q, k, positions, inv_freq, attention_scaling)
    q.copy_(q_rot)
    k.copy_(k_rot)
    store_kv_ref(k_cache, v_cache, slots, k, v, k_scale, v_scale)
