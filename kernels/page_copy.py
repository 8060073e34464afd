"""Copying whole pages of the KV pool, all layers of a range at once, to and from a contiguous buffer.

Rules:
- `kv` is the pool's single tensor `[num_layers, 2 (K, V), num_pages, page_size, kv_heads, head_dim]`
  (`PagedKVPool.kv`), contiguous, or `[num_layers, 1, ...]` for a pool of one plane (V read out of
  K). The buffer is `[layer_end - layer_begin, planes, len(pages), page_size, kv_heads, head_dim]`,
  contiguous, same dtype and device: the layout of one transfer message
  (kvtransfer.layout.MessageSpec).
- `pages` `[N]` (int64 or int32, on the pool's device) in any order. For a scatter they must be
  distinct (two rows written to one page race); values are not checked (no host sync).
- One launch per call covers every (page, layer, K/V) cell: one program copies one page of one
  layer's K or V, `page_size * kv_heads * head_dim` contiguous elements.
- It is a copy of bits: tensors are viewed as same-width integers, so float32/float16/bfloat16 all
  come out bit-exact and the kernel never handles a float type (bfloat16 is unsupported in the
  Triton interpreter).
- On CUDA it launches on `kv`'s device, on the current stream (callers pick the stream).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 1024


@triton.jit
def _page_copy_kernel(
    pool,
    buf,
    pages,
    layer_begin,
    pool_stride_layer,
    pool_stride_kv,
    buf_stride_layer,
    buf_stride_kv,
    page_elems,
    planes,
    TO_BUF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    cell = tl.program_id(1)  # local layer * planes + plane (0: K, 1: V)
    layer = (cell // planes).to(tl.int64)
    kv = (cell % planes).to(tl.int64)
    page = tl.load(pages + n).to(tl.int64)
    # int64 offsets: a pool easily holds more than 2**31 elements.
    pool_base = (layer_begin + layer) * pool_stride_layer + kv * pool_stride_kv + page * page_elems
    buf_base = layer * buf_stride_layer + kv * buf_stride_kv + n.to(tl.int64) * page_elems
    for start in range(0, page_elems, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < page_elems
        if TO_BUF:
            tl.store(buf + buf_base + offs, tl.load(pool + pool_base + offs, mask=mask), mask=mask)
        else:
            tl.store(pool + pool_base + offs, tl.load(buf + buf_base + offs, mask=mask), mask=mask)


def _check(
    kv: torch.Tensor, pages: torch.Tensor, layer_begin: int, layer_end: int, buf: torch.Tensor
) -> None:
    assert kv.ndim == 6 and kv.shape[1] in (1, 2), (
        f"kv must be [layers, 2 or 1, pages, page_size, heads, dim]: {kv.shape}"
    )
    assert kv.is_contiguous() and buf.is_contiguous(), "pool and buffer must be contiguous"
    assert 0 <= layer_begin <= layer_end <= kv.shape[0], (layer_begin, layer_end, kv.shape[0])
    assert pages.ndim == 1 and pages.dtype in (torch.int64, torch.int32), (pages.shape, pages.dtype)
    assert pages.stride(0) == 1 or pages.numel() <= 1, "pages must be contiguous"
    expected = (layer_end - layer_begin, kv.shape[1], pages.shape[0], *kv.shape[3:])
    assert tuple(buf.shape) == expected, f"buffer {tuple(buf.shape)}, expected {expected}"
    assert buf.dtype == kv.dtype, (buf.dtype, kv.dtype)
    assert kv.element_size() in _BITS, kv.dtype
    assert buf.device == kv.device == pages.device, (buf.device, kv.device, pages.device)


def _launch(kv: torch.Tensor, pages: torch.Tensor, layer_begin: int, buf: torch.Tensor, to_buf: bool) -> None:
    num_pages, num_cells = buf.shape[2], buf.shape[0] * buf.shape[1]
    if num_pages == 0 or num_cells == 0:
        return
    bits = _BITS[kv.element_size()]
    pool_bits, buf_bits = kv.view(bits), buf.view(bits)
    page_elems = kv[0, 0, 0].numel()
    # Triton launches on the current device; the pool may live on another one.
    guard = torch.cuda.device(kv.device) if kv.is_cuda else contextlib.nullcontext()
    with guard:
        _page_copy_kernel[(num_pages, num_cells)](
            pool_bits,
            buf_bits,
            pages,
            layer_begin,
            kv.stride(0),
            kv.stride(1),
            buf.stride(0),
            buf.stride(1),
            page_elems,
            buf.shape[1],
            TO_BUF=to_buf,
            BLOCK=min(_BLOCK, triton.next_power_of_2(page_elems)),
        )


def gather_kv_pages(
    kv: torch.Tensor, pages: torch.Tensor, layer_begin: int, layer_end: int, out: torch.Tensor
) -> None:
    """out[i, j, n] = kv[layer_begin + i, j, pages[n]] for every layer i of the range, K/V j and page n."""
    _check(kv, pages, layer_begin, layer_end, out)
    _launch(kv, pages, layer_begin, out, to_buf=True)


def scatter_kv_pages(
    kv: torch.Tensor, pages: torch.Tensor, layer_begin: int, layer_end: int, src: torch.Tensor
) -> None:
    """kv[layer_begin + i, j, pages[n]] = src[i, j, n]; `pages` must be distinct."""
    _check(kv, pages, layer_begin, layer_end, src)
    _launch(kv, pages, layer_begin, src, to_buf=False)


def gather_kv_pages_ref(
    kv: torch.Tensor, pages: torch.Tensor, layer_begin: int, layer_end: int
) -> torch.Tensor:
    """The oracle of `gather_kv_pages`: a new `[layers, 2, pages, ...]` tensor, by torch indexing."""
    return kv[layer_begin:layer_end][:, :, pages.long()].clone()


def scatter_kv_pages_ref(
    kv: torch.Tensor, pages: torch.Tensor, layer_begin: int, layer_end: int, src: torch.Tensor
) -> None:
    """The oracle of `scatter_kv_pages`, by torch indexing (in place)."""
    kv[layer_begin:layer_end, :, pages.long()] = src
