"""Prefill / chunked-prefill attention over the paged KV pool (Triton), with its pure-torch reference.

Rules (those of shared/engine/attention_ref.py, which this kernel must reproduce):
- Reads q [T, Hq, D]: request i's new tokens are rows extend_start_loc[i] .. + extend_lens[i].
- Reads one layer's pool tensors k_pages/v_pages [num_pages, page_size, Hkv, D]. The new tokens'
  K/V are already stored there, so request i attends over pool positions 0 .. seq_lens[i]-1, token
  j living in page page_table[i, j // page_size] at offset j % page_size. Page-table columns past
  a row's sequence (padding, page 0) are never read.
- New token t of request i sits at absolute position seq_lens[i] - extend_lens[i] + t and sees the
  keys at positions <= its own: its cached prefix fully, its own chunk causally.
- Sliding window (`window`, None = none): a query at position p sees only the keys at positions
  > p - window (Hugging Face's convention: the last `window` keys, itself included).
- Logit soft-capping (`softcap`, None = none): scores become softcap * tanh(scores / softcap)
  after the scale and before the softmax (Gemma 2).
- GQA: query head h reads kv head h // (Hq // Hkv).
- Writes out [T, Hq, D] (q's dtype) for the rows of requests with extend_len > 0, nothing else.
- Online softmax (flash attention) in float32; p is cast to V's dtype for the second matmul, as
  every flash kernel does, so half-precision results differ from the reference by that rounding.
- An fp8 pool (kernels.fp8_kv; q in any float dtype) needs `k_scale` and `v_scale`: K and V are
  read as q's dtype (exact: every fp8 value is a float16/bfloat16 value), K's scale joins the
  score scale and V's multiplies the output, in float32. The reference dequantizes first.

Grid: (Hq, query blocks, requests). Heads vary fastest so the programs reading one kv head's pages
run together and share them through L2; query blocks are walked last-first so the longest programs
(the diagonal blocks see the most keys) start first and the tail is short.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pdserve.kernels.attention_mask import hidden_keys, soft_cap
from pdserve.kernels.fp8_kv_format import check_scales, dequantize_kv_ref, is_fp8

_LOG2E = 1.4426950408889634


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter has no libdevice): sign(x) (1 - e) / (1 + e), e = exp(-2|x|),
    which neither overflows nor loses more than ~1e-7 absolute near 0."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # 2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_key_block(
    q,
    acc,
    l_i,
    m_i,
    q_pos,
    start_n,
    seq_len,
    k_ptr,
    v_ptr,
    page_row_ptr,
    kv_head_off,
    stride_kp,
    stride_ks,
    qk_scale,
    window,
    softcap,
    offs_n,
    offs_d,
    mask_d,
    PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N block of keys folded into the running (acc, l_i, m_i); scores in log2 units
    (`softcap` too, so that cap * tanh(s / cap) keeps its form after the log2(e) factor)."""
    key_pos = start_n + offs_n
    if MASKED:
        mask_n = key_pos < seq_len
        # masked lanes read page 0 offsets, but the loads below are masked too: never touched
        page = tl.load(page_row_ptr + key_pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    else:
        page = tl.load(page_row_ptr + key_pos // PAGE_SIZE).to(tl.int64)
    kv_off = page * stride_kp + (key_pos % PAGE_SIZE) * stride_ks + kv_head_off
    if MASKED:
        k = tl.load(
            k_ptr + kv_off[None, :] + offs_d[:, None], mask=mask_d[:, None] & mask_n[None, :], other=0.0
        )
        v = tl.load(
            v_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
    else:
        k = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None], mask=mask_d[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
    k = k.to(q.dtype)  # a no-op but for an fp8 pool (whose scales the caller applies)
    v = v.to(q.dtype)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        qk = softcap * tanh(qk / softcap)
    if MASKED:
        visible = (key_pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if WINDOWED:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if WINDOWED:
        # A row may see no key of a block its window starts past: shift by 0 there, not -inf (NaN).
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    # Without a window every row sees at least one key of the first block it meets (see the
    # kernel), so m_new is finite from then on and exp2(-inf - m_new) = 0 for hidden keys.
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _extend_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    page_table_ptr,
    seq_lens_ptr,
    extend_lens_ptr,
    extend_start_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    window,
    softcap,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_pt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,  # False: the scale pointers are placeholders, never read
):
    head = tl.program_id(0)
    block_m = tl.num_programs(1) - 1 - tl.program_id(1)
    qk_scale = tl.cast(qk_scale, tl.float32)  # see decode_attention: float args may come as fp64
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    req = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + req).to(tl.int32)
    if block_m * BLOCK_M >= extend_len:
        return
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    prefix_len = seq_len - extend_len
    q_start = tl.load(extend_start_ptr + req).to(tl.int64)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < extend_len
    mask_d = offs_d < HEAD_DIM
    q_rows = q_start + offs_m
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    page_row_ptr = page_table_ptr + req.to(tl.int64) * stride_pt
    kv_head_off = (head // GROUP).to(tl.int64) * stride_kh

    # The diagonal ends after the last key the block's last row can see, so fully masked key
    # blocks are skipped.
    causal_end = tl.minimum(seq_len, prefix_len + (block_m + 1) * BLOCK_M)
    if WINDOWED:
        # Keys from the first row's window start on, all masked (window and causal edges); rows
        # that see nothing in a block are guarded in _attend_key_block.
        full_end = 0
        masked_start = tl.maximum(prefix_len + block_m * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        # Keys before the block's first query position are seen by every row in full: whole key
        # blocks of them need no mask (they are all < seq_len since block_m * BLOCK_M < extend_len).
        # The masked part then starts at full_end <= every row's position, so each row (padding
        # rows past extend_len too) sees a key in its first block.
        full_end = (prefix_len + block_m * BLOCK_M) // BLOCK_N * BLOCK_N
        masked_start = full_end
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_block(
            q, acc, l_i, m_i, q_pos, start_n, seq_len, k_ptr, v_ptr, page_row_ptr, kv_head_off,
            stride_kp, stride_ks, qk_scale, window, softcap, offs_n, offs_d, mask_d,
            PAGE_SIZE=PAGE_SIZE, MASKED=False, WINDOWED=False, SOFTCAP=SOFTCAP,
            DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    for start_n in range(masked_start, causal_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_block(
            q, acc, l_i, m_i, q_pos, start_n, seq_len, k_ptr, v_ptr, page_row_ptr, kv_head_off,
            stride_kp, stride_ks, qk_scale, window, softcap, offs_n, offs_d, mask_d,
            PAGE_SIZE=PAGE_SIZE, MASKED=True, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP,
            DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    # Padding rows past extend_len may see no key under a window (l_i 0); they are not stored.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8_KV:
        out = out * tl.load(v_scale_ptr)
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def extend_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim and dtype: a fixed table, so no
    autotuning runs on a new shape while serving. Chosen for H100/A100-class GPUs (shared memory
    ~228/164 KiB): half precision tiles of 128 x 64; float32 (the exactness path) halves them."""
    block_d = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        if block_d > 256:
            return 16, 16, 4, 1
        return (64, 32, 4, 2) if block_d <= 64 else (32, 32, 4, 2)
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        return 128, 64, 8, 3
    if block_d <= 256:
        return 64, 32, 4, 2
    return 16, 16, 4, 1  # MLA's 576 (padded to 1024): q, K and V tiles must still fit shared memory


def _check_lengths(name: str, t: torch.Tensor, batch: int, device: torch.device) -> None:
    assert t.shape == (batch,), f"{name} must be [B]={batch}, got {tuple(t.shape)}"
    assert t.dtype in (torch.int32, torch.int64), f"{name} must be int32/int64, got {t.dtype}"
    assert t.device == device and t.stride(0) == 1, f"{name} must be contiguous on {device}"


def check_pages(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor
) -> tuple[int, int, int]:
    """Shared launcher asserts for q [*, Hq, D] over the pool; returns (num_q_heads, num_kv_heads, head_dim)."""
    assert q.dim() == 3 and q.stride(2) == 1, "q must be [rows, Hq, D] with a contiguous last dim"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert k_pages.dim() == 4 and k_pages.shape == v_pages.shape, (
        "k/v pages must be [pages, page_size, Hkv, D]"
    )
    assert k_pages.is_contiguous() and v_pages.is_contiguous(), "k/v pages must be contiguous"
    assert k_pages.dtype == v_pages.dtype and (k_pages.dtype == q.dtype or is_fp8(k_pages.dtype)), (
        f"q {q.dtype}, k {k_pages.dtype}, v {v_pages.dtype} differ"
    )
    _, _, num_kv_heads, head_dim = k_pages.shape
    num_q_heads = q.shape[1]
    assert q.shape[2] == head_dim, f"q head dim {q.shape[2]} != pool head dim {head_dim}"
    assert num_q_heads % num_kv_heads == 0, f"Hq {num_q_heads} not a multiple of Hkv {num_kv_heads}"
    # below 16 the head dim is padded up to tl.dot's minimum tile (BLOCK_D) and masked
    # up to 576: MLA's latent + rope vector (kv_lora_rank 512 + qk_rope_head_dim 64), one KV head
    assert 1 <= head_dim <= 576, f"head dim {head_dim} outside 1..576"
    assert page_table.dim() == 2 and page_table.dtype == torch.int32, (
        "page_table must be int32 [B, max_pages]"
    )
    assert page_table.stride(1) == 1 or page_table.shape[1] <= 1, "page_table rows must be contiguous"
    assert q.device == k_pages.device == v_pages.device == page_table.device, "tensors on different devices"
    return num_q_heads, num_kv_heads, head_dim


def check_window_softcap(window: int | None, softcap: float | None) -> None:
    """Launcher asserts shared with decode_attention: None, or a window of >= 1 key / a cap > 0."""
    assert window is None or (isinstance(window, int) and window >= 1), f"window {window!r} must be >= 1"
    assert softcap is None or softcap > 0, f"softcap {softcap!r} must be > 0"


def extend_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    max_extend_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every request's new tokens over its paged sequence; see the module rules.

    `max_extend_len` (a host int, >= every extend_lens[i]) bounds the query blocks of the grid.
    `block_m`/`block_n` override the tile table (tests use small tiles to cross block edges)."""
    num_q_heads, num_kv_heads, head_dim = check_pages(q, k_pages, v_pages, page_table)
    check_window_softcap(window, softcap)
    check_scales(k_pages.dtype, k_scale, v_scale, q.device)
    batch = page_table.shape[0]
    for name, t in (
        ("seq_lens", seq_lens),
        ("extend_lens", extend_lens),
        ("extend_start_loc", extend_start_loc),
    ):
        _check_lengths(name, t, batch, q.device)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, "out must match q"
    assert out.stride(2) == 1, "out must have a contiguous last dim"
    if batch == 0 or max_extend_len <= 0 or q.shape[0] == 0:
        return out
    cfg_m, cfg_n, num_warps, num_stages = extend_config(head_dim, q.dtype)
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of at least 16"
    grid = (num_q_heads, triton.cdiv(max_extend_len, block_m), batch)
    _extend_attention_kernel[grid](
        q, k_pages, v_pages, out, page_table, seq_lens, extend_lens, extend_start_loc,
        k_scale if k_scale is not None else seq_lens, v_scale if v_scale is not None else seq_lens,
        scale * _LOG2E, window or 0, (softcap or 0.0) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2), page_table.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=k_pages.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WINDOWED=window is not None,
        SOFTCAP=softcap is not None,
        # float32 callers want float32 results (the engine's exact path): no TF32 in the dots
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8_KV=k_scale is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The test oracle in plain torch (float32, one request and one head at a time); an fp8 pool's
    K and V dequantized first. Rows of q that belong to no request come back as zeros."""
    num_q_heads, num_kv_heads = q.shape[1], k_pages.shape[2]
    group = num_q_heads // num_kv_heads
    page_size = k_pages.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i in range(page_table.shape[0]):
        seq_len, extend, start = int(seq_lens[i]), int(extend_lens[i]), int(extend_start_loc[i])
        if extend == 0:
            continue
        positions = torch.arange(seq_len, device=q.device)
        pages = page_table[i].long()[positions // page_size]
        keys = dequantize_kv_ref(k_pages[pages, positions % page_size], k_scale)  # [seq_len, Hkv, D]
        values = dequantize_kv_ref(v_pages[pages, positions % page_size], v_scale)
        q_pos = torch.arange(seq_len - extend, seq_len, device=q.device)
        hidden = hidden_keys(positions, q_pos, window)  # [extend, seq_len]
        for h in range(num_q_heads):
            qh = q[start : start + extend, h].float()
            scores = soft_cap((qh @ keys[:, h // group].T) * scale, softcap)
            probs = torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1)
            out[start : start + extend, h] = probs @ values[:, h // group]
    return out.to(q.dtype)
