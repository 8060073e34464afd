"""A KV pool seen through a slice of its KV heads, for transfers between workers of different
tensor-parallel widths (shared/engine/tp_kv_transfer.py).

A rank of a `--tp N` worker stores only its KV heads; a decode rank of another width needs other
slices of them. A backend that copies pages with torch indexing (fake, zmq: gather with
index_select, scatter with index_copy_, which read and write strided views in place) moves a
head slice through a view of the pool, `head_slice_pool(pool, start, stop)`: the same page ids,
`[num_pages, page_size, stop - start, head_dim]` per layer, no copy of the pool. Its manager
takes `heads=(start, stop)` per handle (base.py), so one manager moves whole pools and every
slice of its pool alike; the two sides of a head leg name it `leg_rid(rid, head)`.

Backends whose copies need the whole contiguous pool (cuda_ipc maps it, nccl's kernels gather
it) cannot: their managers' `moves_head_slices` is false, and a worker offers head slices only
when it is true.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.kvtransfer.base import HeadRange, KVTransferError
from pdserve.kvtransfer.layout import KVLayout
from pdserve.shared.engine.kv_pool import PagedKVPool


@dataclass(frozen=True)
class KVRegion:
    """What one transfer reads or writes: its manager's pool, or a head slice of it, and the layout
    of that."""

    pool: PagedKVPool
    layout: KVLayout

    @classmethod
    def of(cls, pool: PagedKVPool, heads: HeadRange | None = None) -> KVRegion:
        """`pool`, or its `heads` slice; heads outside the pool refuse the handle (KVTransferError)."""
        try:
            view = pool if heads is None else head_slice_pool(pool, *heads)
        except ValueError as exc:
            raise KVTransferError(str(exc)) from exc
        return cls(view, KVLayout.of(view))


def leg_rid(rid: str, head: int) -> str:
    """The transfer name of request `rid`'s leg of global KV head `head`, alike on both sides."""
    return f"{rid}#kv-head{head}"


def head_slice_pool(pool: PagedKVPool, start: int, stop: int) -> PagedKVPool:
    """Heads [start, stop) of `pool` as a pool of their own (views: writes land in `pool`)."""
    heads = pool.shape.num_kv_heads
    if not 0 <= start < stop <= heads:
        raise ValueError(f"head slice [{start}, {stop}) of a pool with {heads} KV heads")
    view = object.__new__(PagedKVPool)  # no allocation: every tensor is a view of `pool`
    view.shape = dataclasses.replace(pool.shape, num_kv_heads=stop - start)
    view.dtype = pool.dtype
    view.device = pool.device
    view.kv = pool.kv[:, :, :, :, start:stop]
    view.k_buffers = [view.kv[layer, 0] for layer in range(view.shape.num_layers)]
    view.v_buffers = [view.kv[layer, -1] for layer in range(view.shape.num_layers)]
    view.kv_scales = pool.kv_scales  # per layer and plane, not per head: shared as they are
    return view
