"""The Triton kernel of page_move.py (kept apart so that importing page_move never loads Triton).

One program copies one page of one layer's K or V (a plane: `planes` per layer, 2 or 1) from `src` to `dst`, `page_words` words, in
BLOCK-wide steps; pools and buffers are seen as flat arrays of same-width integer words.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def page_move_kernel(
    src,
    dst,
    src_pages,
    dst_pages,
    layer_begin,
    src_stride_layer,
    src_stride_kv,
    dst_stride_layer,
    dst_stride_kv,
    page_words,
    planes,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    cell = tl.program_id(1)  # local layer * planes + plane (0: K, 1: V)
    layer = layer_begin + (cell // planes).to(tl.int64)
    kv = (cell % planes).to(tl.int64)
    src_page = tl.load(src_pages + n).to(tl.int64)
    dst_page = tl.load(dst_pages + n).to(tl.int64)
    # int64 offsets: a pool easily holds more than 2**31 words.
    src_base = layer * src_stride_layer + kv * src_stride_kv + src_page * page_words
    dst_base = layer * dst_stride_layer + kv * dst_stride_kv + dst_page * page_words
    for start in range(0, page_words, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < page_words
        tl.store(dst + dst_base + offs, tl.load(src + src_base + offs, mask=mask), mask=mask)
