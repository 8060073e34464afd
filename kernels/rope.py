"""Rotary position embedding of q and k in place, cos/sin computed in the kernel (shared.models.rope).

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
- One program per (token, block of heads); a grid from shapes only: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _rotate_heads(
    base,
    head_stride,
    head0,
    num_heads,
    c,
    s,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first = base + heads[:, None] * head_stride + dims[None, :]
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    o1 = x1 * c[None, :] - x2 * s[None, :]
    o2 = x2 * c[None, :] + x1 * s[None, :]
    tl.store(first, o1.to(base.dtype.element_ty), mask=mask)
    tl.store(first + HALF, o2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q,
    k,
    positions,
    inv_freq,
    attention_scaling,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    dims = tl.arange(0, BLOCK_HALF)
    freq = tl.load(inv_freq + dims, mask=dims < HALF, other=0.0)
    angle = tl.load(positions + token).to(tl.float32) * freq
    c, s = _cos_sin(angle)
    scaling = tl.cast(attention_scaling, tl.float32)  # see decode_attention: float args may come as fp64
    c = c * scaling
    s = s * scaling
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if block < q_blocks:
        _rotate_heads(
            q + token * q_stride_t, q_stride_h, block * BLOCK_H, num_q_heads, c, s, HALF, BLOCK_H, BLOCK_HALF
        )
    else:
        k_head0 = (block - q_blocks) * BLOCK_H
        _rotate_heads(
            k + token * k_stride_t, k_stride_h, k_head0, num_kv_heads, c, s, HALF, BLOCK_H, BLOCK_HALF
        )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q `[T, Hq, D]` and k `[T, Hkv, D]` in place by the rope angles of `positions`; returns (q, k)."""
    assert q.ndim == 3 and k.ndim == 3, (q.shape, k.shape)
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (tokens, num_kv_heads, head_dim), (q.shape, k.shape)
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    assert q.dtype == k.dtype and q.dtype in _DTYPES, (q.dtype, k.dtype)
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need a contiguous last dim"
    assert positions.shape == (tokens,) and positions.dtype in (torch.int64, torch.int32), positions.shape
    assert positions.stride(0) == 1 or tokens <= 1, "positions must be contiguous"
    half = head_dim // 2
    assert inv_freq.shape == (half,) and inv_freq.dtype == torch.float32 and inv_freq.is_contiguous()
    assert q.device == k.device == positions.device == inv_freq.device, "tensors on different devices"
    if tokens == 0:
        return q, k
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_kv_heads)), max(1, 2048 // block_half))
    grid = (tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    _rope_kernel[grid](
        q,
        k,
        positions,
        inv_freq,
        float(attention_scaling),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        num_q_heads,
        num_kv_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
    )
    return q, k


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
