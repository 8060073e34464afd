"""A KV pool seen through a slice of its KV heads, for transfers between workers of different
tensor-parallel widths (shared/engine/tp_kv_transfer.py).

A rank of a `--tp N` worker stores only its KV heads; a decode rank of another width needs other
slices of them. A backend that copies pages with torch indexing (fake, zmq: gather with
index_select, scatter with index_copy_, which read and write strided views in place) moves a
head slice when it is given `head_slice_pool(pool, start, stop)` in place of the pool: the same
page ids, `[num_pages, page_size, stop - start, head_dim]` per layer, no copy of the pool.

Backends whose copies need the whole contiguous pool (cuda_ipc maps it, nccl's kernels gather
it) cannot: `moves_head_slices` says which can, and a worker offers head slices only then.
"""

from __future__ import annotations

import dataclasses

from pdserve.shared.engine.kv_pool import PagedKVPool

HEAD_SLICE_BACKENDS = ("fake", "zmq")


def moves_head_slices(backend: str, device_type: str) -> bool:
    """Whether the worker's backend (`auto` resolved for its device) moves head-slice views."""
    from pdserve.kvtransfer.auto import worker_backend

    return worker_backend(backend, device_type) in HEAD_SLICE_BACKENDS


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
