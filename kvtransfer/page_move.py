"""Copying pages from one KV pool straight into another, all layers of a range in one launch.

    move_kv_pages(src_kv, src_pages, dst_kv, dst_pages, layer_begin, layer_end)
    # dst_kv[l, j, dst_pages[n]] = src_kv[l, j, src_pages[n]] for l in [layer_begin, layer_end), j in K/V

The cuda_ipc backend's copy: `src_kv` is the sender's pool, `dst_kv` the receiver's pool mapped into
the sender's process (same GPU, or a peer GPU over NVLink/PCIe), so a request's pages move with no
staging buffer. kernels/page_copy.py copies between a pool and a contiguous buffer; this is its
pool-to-pool sibling, written the same way.

Rules:
- Both pools are `[num_layers, 2 (K, V), num_pages, page_size, kv_heads, head_dim]`, contiguous,
  same dtype and page shape (page counts may differ), or both of one plane (`[num_layers, 1, ...]`,
  kv_pool's one-plane pool); page ids are int64 or int32 tensors on the
  copying device, `dst_pages` distinct (two programs writing one page race); values are not checked
  (no host sync): callers validate page ids against the pools first.
- One Triton program copies one page of one layer's K or V; the grid covers every (page, cell).
- A copy of bits: tensors are viewed as the widest integer word that divides a page (up to 8
  bytes), so every dtype comes out bit-exact and fewer, wider loads move it.
- CUDA: launches on `src_kv`'s device, on the current stream. CPU pools: torch indexing (the
  `*_ref` below); Triton is imported only for CUDA pools, so CPU processes never load it.
"""

from __future__ import annotations

import contextlib

import torch


def move_kv_pages_ref(
    src_kv: torch.Tensor,
    src_pages: torch.Tensor,
    dst_kv: torch.Tensor,
    dst_pages: torch.Tensor,
    layer_begin: int,
    layer_end: int,
) -> None:
    """The oracle of the kernel, by torch indexing (in place). Also the CPU path."""
    dst_kv[layer_begin:layer_end, :, dst_pages.long()] = src_kv[layer_begin:layer_end, :, src_pages.long()]


def _check(
    src_kv: torch.Tensor,
    src_pages: torch.Tensor,
    dst_kv: torch.Tensor,
    dst_pages: torch.Tensor,
    layer_begin: int,
    layer_end: int,
) -> None:
    for name, kv in (("src_kv", src_kv), ("dst_kv", dst_kv)):
        assert kv.ndim == 6 and kv.shape[1] in (1, 2), (
            f"{name} must be [layers, 2 or 1, pages, page_size, heads, dim]"
        )
        assert kv.is_contiguous(), f"{name} must be contiguous"
    assert src_kv.dtype == dst_kv.dtype, (src_kv.dtype, dst_kv.dtype)
    assert src_kv.shape[:2] == dst_kv.shape[:2] and src_kv.shape[3:] == dst_kv.shape[3:], (
        f"page layouts differ: {tuple(src_kv.shape)} vs {tuple(dst_kv.shape)}"
    )
    assert 0 <= layer_begin <= layer_end <= src_kv.shape[0], (layer_begin, layer_end, src_kv.shape[0])
    for name, pages in (("src_pages", src_pages), ("dst_pages", dst_pages)):
        assert pages.ndim == 1 and pages.dtype in (torch.int64, torch.int32), (name, pages.shape, pages.dtype)
        assert pages.is_contiguous(), f"{name} must be contiguous"
        assert pages.device == src_kv.device, (name, pages.device, src_kv.device)
    assert src_pages.shape == dst_pages.shape, (src_pages.shape, dst_pages.shape)


def _word(kv: torch.Tensor) -> torch.dtype:
    """The widest integer word (<= 8 bytes) that divides a page and the pool's storage offset."""
    page_bytes = kv[0, 0, 0].numel() * kv.element_size()
    offset_bytes = kv.storage_offset() * kv.element_size()
    for size, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if page_bytes % size == 0 and offset_bytes % size == 0:
            return dtype
    return torch.uint8


def _as_words(kv: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    flat = kv.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.view(word)


def _launch(
    src_kv: torch.Tensor,
    src_pages: torch.Tensor,
    dst_kv: torch.Tensor,
    dst_pages: torch.Tensor,
    layer_begin: int,
    layer_end: int,
) -> None:
    import triton  # here: CPU-only processes never load Triton

    from pdserve.kvtransfer.page_move_kernel import page_move_kernel

    planes = src_kv.shape[1]
    num_pages, num_cells = src_pages.shape[0], (layer_end - layer_begin) * planes
    if num_pages == 0 or num_cells == 0:
        return
    word = _word(src_kv) if _word(src_kv) == _word(dst_kv) else torch.uint8
    width = torch.empty((), dtype=word).element_size()
    scale = src_kv.element_size()
    page_words = src_kv[0, 0, 0].numel() * scale // width

    def strides(kv: torch.Tensor) -> tuple[int, int]:
        return kv.stride(0) * scale // width, kv.stride(1) * scale // width

    guard = torch.cuda.device(src_kv.device) if src_kv.is_cuda else contextlib.nullcontext()
    with guard:
        page_move_kernel[(num_pages, num_cells)](
            _as_words(src_kv, word),
            _as_words(dst_kv, word),
            src_pages,
            dst_pages,
            layer_begin,
            *strides(src_kv),
            *strides(dst_kv),
            page_words,
            planes,
            BLOCK=min(2048, triton.next_power_of_2(page_words)),
        )


def move_kv_pages(
    src_kv: torch.Tensor,
    src_pages: torch.Tensor,
    dst_kv: torch.Tensor,
    dst_pages: torch.Tensor,
    layer_begin: int,
    layer_end: int,
    use_kernel: bool | None = None,
) -> None:
    """dst_kv[l, j, dst_pages[n]] = src_kv[l, j, src_pages[n]] for the layer range, K and V.
    `use_kernel`: None picks the Triton kernel for CUDA pools and torch indexing for CPU pools."""
    _check(src_kv, src_pages, dst_kv, dst_pages, layer_begin, layer_end)
    if use_kernel if use_kernel is not None else src_kv.is_cuda:
        _launch(src_kv, src_pages, dst_kv, dst_pages, layer_begin, layer_end)
    else:
        move_kv_pages_ref(src_kv, src_pages, dst_kv, dst_pages, layer_begin, layer_end)
