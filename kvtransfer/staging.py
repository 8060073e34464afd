"""Copying a message's pages out of a pool and into one, and the host buffers zmq sends from.

`gather_pages` and `scatter_pages` move one message (layout.MessageSpec) between a pool and a
contiguous `[layers, planes (2: K, V; 1: one-plane pools), pages, page_size, kv_heads, head_dim]` tensor. On CUDA that is one Triton
launch for all the message's layers (kernels.page_copy over the pool's single `kv` tensor); on CPU
one index_select / index_copy_ per layer and K/V. On CUDA they run on the given side stream, wait
for the caller's `ready_event` first (gather) and synchronize before returning: callers hold the
transfer's lock around them, so when the lock is released no copy is still reading or writing the
pages.

`HostStagingPool` keeps a few reusable host slabs (pinned when the pool is on CUDA, so device-to-
host copies run at full speed and asynchronously). A slab handed to ZMQ zero-copy stays busy until
ZMQ's MessageTracker says the bytes left; the pool never grows past `max_slabs`, so a slow peer
back-pressures the sender instead of growing memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.layout import MessageSpec
from pdserve.shared.engine.kv_pool import PagedKVPool


def _page_index(pool: PagedKVPool, pages: list[int]) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.long, device=pool.device)


def _gather_into(pool: PagedKVPool, idx: torch.Tensor, spec: MessageSpec, out: torch.Tensor) -> None:
    for i, layer in enumerate(range(spec.layer_begin, spec.layer_end)):
        for plane in range(pool.shape.num_planes):
            if out.device == pool.device:
                torch.index_select(pool.kv[layer, plane], 0, idx, out=out[i, plane])
            else:
                out[i, plane].copy_(pool.kv[layer, plane].index_select(0, idx))


def _by_indexing(pool: PagedKVPool, ready_event: Any = None) -> bool:
    """CPU pools, and head-slice views of CUDA pools (kvtransfer/head_slice.py: the kernels need
    the contiguous pool), copy with torch indexing; a CUDA view first waits for `ready_event`."""
    if pool.device.type == "cuda" and pool.kv.is_contiguous():
        return False
    if ready_event is not None:
        ready_event.synchronize()
    return True


def gather_pages(
    pool: PagedKVPool,
    pages: list[int],
    spec: MessageSpec,
    out: torch.Tensor,
    stream: Any = None,
    ready_event: Any = None,
) -> None:
    """Copies K and V of `pages` for the spec's layers into `out` (host or pool device)."""
    if _by_indexing(pool, ready_event):
        _gather_into(pool, _page_index(pool, pages), spec, out)
        if pool.device.type == "cuda":
            torch.cuda.synchronize(pool.device)
        return
    from pdserve.kernels.page_copy import gather_kv_pages  # here: CPU-only processes never load Triton

    with torch.cuda.stream(stream):
        if ready_event is not None:
            stream.wait_event(ready_event)
        idx = _page_index(pool, pages)
        if out.device == pool.device:
            gather_kv_pages(pool.kv, idx, spec.layer_begin, spec.layer_end, out)
        else:
            staged = torch.empty(out.shape, dtype=out.dtype, device=pool.device)
            gather_kv_pages(pool.kv, idx, spec.layer_begin, spec.layer_end, staged)
            out.copy_(staged, non_blocking=True)
    stream.synchronize()


def scatter_pages(
    pool: PagedKVPool, pages: list[int], spec: MessageSpec, src: torch.Tensor, stream: Any = None
) -> None:
    """Writes `src` ([layers, 2, pages, ...], host or pool device) into `pages` for the spec's layers."""
    if not _by_indexing(pool):
        from pdserve.kernels.page_copy import scatter_kv_pages  # here: CPU-only processes never load Triton

        with torch.cuda.stream(stream):
            idx = _page_index(pool, pages)
            src = src.to(pool.device, non_blocking=True).contiguous()
            scatter_kv_pages(pool.kv, idx, spec.layer_begin, spec.layer_end, src)
        stream.synchronize()
        return
    idx = _page_index(pool, pages)
    # torch's CPU index_copy_ has no float8: an fp8 pool's pages are copied as the bytes they are
    kv, src = (
        (pool.kv.view(torch.uint8), src.view(torch.uint8)) if pool.kv.element_size() == 1 else (pool.kv, src)
    )
    src = src.to(pool.device)
    for i, layer in enumerate(range(spec.layer_begin, spec.layer_end)):
        for plane in range(pool.shape.num_planes):
            kv[layer, plane].index_copy_(0, idx, src[i, plane])
    if pool.device.type == "cuda":
        torch.cuda.synchronize(pool.device)


@dataclass(eq=False)
class Slab:
    buffer: torch.Tensor  # uint8, 1-D
    in_use: bool = True
    tracker: Any = None  # zmq.MessageTracker of the message that carries it

    def is_free(self) -> bool:
        return not self.in_use and (self.tracker is None or self.tracker.done)


class HostStagingPool:
    def __init__(self, slab_bytes: int, max_slabs: int, pin: bool):
        self.slab_bytes = slab_bytes
        self.max_slabs = max_slabs
        self.pin = pin
        self._slabs: list[Slab] = []

    def _new(self, nbytes: int) -> Slab:
        return Slab(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin))

    def acquire(self, nbytes: int) -> Slab | None:
        """A slab of at least nbytes, or None while every slab is still with ZMQ."""
        if nbytes > self.slab_bytes:
            return self._new(nbytes)  # a single page-layer larger than a slab: one-off buffer
        for slab in self._slabs:
            if slab.is_free():
                slab.in_use, slab.tracker = True, None
                return slab
        if len(self._slabs) < self.max_slabs:
            slab = self._new(self.slab_bytes)
            self._slabs.append(slab)
            return slab
        return None

    @staticmethod
    def release(slab: Slab, tracker: Any = None) -> None:
        """The slab is free again once `tracker` (if any) is done."""
        slab.tracker = tracker if tracker not in (None, False) else None
        slab.in_use = False
