"""Decode attention over the paged KV pool (Triton, split-KV in two stages), with its pure-torch reference.

Rules:
- Reads q [B, Hq, D]: one new token per request, at position seq_lens[i] - 1, whose K/V are
  already in the pool; it attends to positions 0 .. seq_lens[i]-1 of k_pages/v_pages
  [num_pages, page_size, Hkv, D], token j in page page_table[i, j // page_size] at offset
  j % page_size. Page-table columns past a row's sequence are never read.
- GQA: query head h reads kv head h // (Hq // Hkv).
- Sliding window and logit soft-capping as in extend_attention: with `window`, the query (at
  position seq_len - 1) sees positions >= seq_len - window only, and the splits share just those.
- Stage 1, grid (B, Hkv, num_kv_splits): one program takes all query heads of one kv head over
  one slice of the sequence (so each KV page is read once per group), and writes the slice's
  normalised partial output and its log2-sum-exp of the scaled scores into a float32 workspace:
  partials [B, Hq, S, D] followed by lse [B, Hq, S] (S = num_kv_splits). A slice with no keys
  writes zeros and lse -inf.
- Stage 2, grid (B, Hq): weights the splits by exp2(lse - max lse) and writes out [B, Hq, D] in
  q's dtype. A row with seq_len 0 (padding rows of a CUDA-graph batch) reads no key and gets 0.
- CUDA-graph safe: no host syncs, and both grids depend only on shapes and num_kv_splits; pass a
  preallocated `workspace` so a captured graph keeps reusing the same memory.
- Scores, softmax and sums in float32; p is cast to V's dtype for the second matmul.
- An fp8 pool with `k_scale`/`v_scale`: as extend_attention (K and V read as q's dtype, K's scale
  in the score scale, V's on each split's partial output), except under a bf16 q, where q, K, V and
  p enter the dots as float16: e4m3 and e5m2 widen to float16 in one conversion per two values,
  and on to bf16 only through two more per value, which left the kernel bound by conversions at
  half the copy rate (H100, batch 64 x 1,280). Every e4m3/e5m2 value is exact in float16; q and p
  round to float16's finer mantissa.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention_mask import hidden_keys, soft_cap
from pdserve.kernels.extend_attention import check_pages, check_window_softcap, tanh
from pdserve.kernels.fp8_kv_format import check_scales, dequantize_kv_ref

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    part_ptr,
    lse_ptr,
    page_table_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    window,
    softcap,
    num_q_heads,
    num_kv_splits,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_pt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,  # False: the scale pointers are placeholders, never read
    FP8_IN_F16: tl.constexpr,  # an fp8 pool under a bf16 q: the dots run in float16
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # torch.compile (inductor) passes Python floats as fp64 scalars: kept, they would promote the
    # scores, and the loop-carried softmax state, to fp64
    qk_scale = tl.cast(qk_scale, tl.float32)
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    # The keys read: the window's (from seq_len - window), else all. Slices are whole BLOCK_N
    # blocks from there, so only the last block is partial.
    first_key = tl.maximum(seq_len - window, 0) if WINDOWED else 0
    blocks_per_split = tl.cdiv(tl.cdiv(seq_len - first_key, BLOCK_N), num_kv_splits)
    start = first_key + split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, seq_len)

    # The group's heads are the rows of one tl.dot, padded to BLOCK_H >= 16 (tl.dot's minimum).
    # Decode is bound by reading KV: the padded rows cost idle tensor-core lanes, not bytes, and
    # one code path serves every group size (elementwise maths would keep a [G, N, D] product in
    # registers instead).
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(
        q_ptr + req.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    if FP8_IN_F16:
        q = q.to(tl.float16)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    page_row_ptr = page_table_ptr + req.to(tl.int64) * stride_pt
    kv_head_off = kv_head.to(tl.int64) * stride_kh
    for start_n in range(start, end, BLOCK_N):
        key_pos = start_n + offs_n
        mask_n = key_pos < end
        page = tl.load(page_row_ptr + key_pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        kv_off = page * stride_kp + (key_pos % PAGE_SIZE) * stride_ks + kv_head_off
        k = tl.load(
            k_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        v = tl.load(
            v_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        k = k.to(q.dtype)  # a no-op but for an fp8 pool (whose scales apply outside the dots)
        v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:  # softcap comes in log2 units, like qk_scale
            qk = softcap * tanh(qk / softcap)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        # key_pos[0] = start_n < end: every row sees a key in every block, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty slice (start >= end) has l_i == 0: it writes zeros and -inf, which stage 2 weighs 0.
    has_keys = l_i > 0
    part = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if FP8_KV:
        part = part * tl.load(v_scale_ptr)
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    rows = (req.to(tl.int64) * num_q_heads + heads) * num_kv_splits + split  # [B, Hq, S] index
    tl.store(
        part_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], part, mask=mask_h[:, None] & mask_d[None, :]
    )
    tl.store(lse_ptr + rows, lse, mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_q_heads,
    num_kv_splits,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_kv_splits
    mask_d = offs_d < HEAD_DIM
    rows = (req.to(tl.int64) * num_q_heads + head) * num_kv_splits + offs_s
    lse = tl.load(lse_ptr + rows, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # seq_len 0: every split is -inf; shift by 0 instead so the weights are 0, not NaN
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    parts = tl.load(
        part_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + req.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


def decode_workspace_numel(batch: int, num_q_heads: int, head_dim: int, num_kv_splits: int) -> int:
    """float32 elements the workspace needs: partials [B, Hq, S, D] then lse [B, Hq, S]."""
    return batch * num_q_heads * num_kv_splits * (head_dim + 1)


def num_kv_splits_for(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    """Splits per sequence so stage 1 has >= 4 programs per SM (enough loads in flight to stream
    KV at full bandwidth): a power of two in 2..max_splits. Depends only on shapes, so a CUDA graph
    captured for a batch size keeps its value."""
    splits = 2
    while splits < max_splits and batch * num_kv_heads * splits < 4 * num_sms:
        splits *= 2
    return splits


def decode_config(head_dim: int, dtype: torch.dtype, fp8_kv: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): a fixed table, no autotuning while serving. An fp8 pool
    takes twice the keys a tile, so each load in flight carries as many bytes as a 16-bit tile
    (decode streams KV: bytes in flight set its rate; bench_attention sweeps BLOCK_N)."""
    if dtype == torch.float32 or triton.next_power_of_2(head_dim) > 128:
        return 32, 4, 2
    return (128 if fp8_kv else 64), 4, 2


def decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_kv_splits: int = 8,
    workspace: torch.Tensor | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per request over its paged sequence; see the module rules.

    `workspace`: a contiguous float32 tensor of at least `decode_workspace_numel(...)` elements
    (allocated here when None). `block_n` overrides the tile table (tests)."""
    num_q_heads, num_kv_heads, head_dim = check_pages(q, k_pages, v_pages, page_table)
    check_window_softcap(window, softcap)
    check_scales(k_pages.dtype, k_scale, v_scale, q.device)
    batch = q.shape[0]
    assert page_table.shape[0] == batch, f"page_table has {page_table.shape[0]} rows for a batch of {batch}"
    assert seq_lens.shape == (batch,) and seq_lens.dtype in (torch.int32, torch.int64), (
        "seq_lens must be int [B]"
    )
    assert seq_lens.device == q.device and seq_lens.stride(0) == 1, (
        "seq_lens must be contiguous on q's device"
    )
    assert 1 <= num_kv_splits <= 1024, f"num_kv_splits {num_kv_splits} outside 1..1024"
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, "out must match q"
    assert out.stride(2) == 1, "out must have a contiguous last dim"
    needed = decode_workspace_numel(batch, num_q_heads, head_dim, num_kv_splits)
    if workspace is None:
        workspace = torch.empty(needed, dtype=torch.float32, device=q.device)
    assert workspace.dtype == torch.float32 and workspace.is_contiguous(), (
        "workspace must be contiguous float32"
    )
    assert workspace.device == q.device and workspace.numel() >= needed, f"workspace needs {needed} elements"
    if batch == 0:
        return out
    flat = workspace.view(-1)
    parts = flat[: batch * num_q_heads * num_kv_splits * head_dim]
    lse = flat[parts.numel() : needed]
    cfg_n, num_warps, num_stages = decode_config(head_dim, q.dtype, fp8_kv=k_scale is not None)
    block_n = block_n or cfg_n
    assert block_n >= 16, "tl.dot needs tiles of at least 16"
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch, num_kv_heads, num_kv_splits)](
        q, k_pages, v_pages, parts, lse, page_table, seq_lens,
        k_scale if k_scale is not None else seq_lens, v_scale if v_scale is not None else seq_lens,
        scale * _LOG2E, window or 0, (softcap or 0.0) * _LOG2E, num_q_heads, num_kv_splits,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), page_table.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        PAGE_SIZE=k_pages.shape[1],
        BLOCK_N=block_n,
        WINDOWED=window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8_KV=k_scale is not None,
        FP8_IN_F16=k_scale is not None and q.dtype == torch.bfloat16,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    _decode_reduce_kernel[(batch, num_q_heads)](
        parts, lse, out, num_q_heads, num_kv_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=max(2, triton.next_power_of_2(num_kv_splits)),
        num_warps=4 if head_dim * num_kv_splits > 2048 else 2,
    )  # fmt: skip
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The test oracle in plain torch (float32, one request and one head at a time); seq_len 0 -> 0;
    an fp8 pool's K and V dequantized first."""
    num_q_heads, num_kv_heads = q.shape[1], k_pages.shape[2]
    group = num_q_heads // num_kv_heads
    page_size = k_pages.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i in range(q.shape[0]):
        seq_len = int(seq_lens[i])
        if seq_len == 0:
            continue
        positions = torch.arange(seq_len, device=q.device)
        pages = page_table[i].long()[positions // page_size]
        keys = dequantize_kv_ref(k_pages[pages, positions % page_size], k_scale)  # [seq_len, Hkv, D]
        values = dequantize_kv_ref(v_pages[pages, positions % page_size], v_scale)
        hidden = hidden_keys(positions, positions[-1:], window)[0]
        for h in range(num_q_heads):
            scores = soft_cap((keys[:, h // group] @ q[i, h].float()) * scale, softcap)
            probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=0)
            out[i, h] = probs @ values[:, h // group]
    return out.to(q.dtype)
