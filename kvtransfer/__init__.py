"""pdserve.kvtransfer: how a prefill worker's KV pages reach a decode worker.

`base.py` is the interface (KVManager, KVSender, KVReceiver, ordered KVPoll, the rules). Backends:
`fake` (in-process, instant: tests and warm-up), `zmq` (host-staged zero-copy frames over TCP, any
hosts), `nccl` (GPU to GPU through NCCL), `cuda_ipc` (peers on one host write straight into each
other's pools) and `auto` (cuda_ipc per pair where it reaches, else zmq or nccl; CPU pools: zmq).
zmq, nccl, cuda_ipc and auto share one control plane: control.py (the loop, sockets and timers)
around transfers.py (the transfer table and its rules, a state machine that touches no socket),
with the data planes behind data_plane.py; plane_host.py is all either may ask of the other parts.
`make_kv_manager` builds one by name.

May import: pdserve.shared.engine's KV pool (what it moves) and pdserve.kernels (page copies).
Never the roles, the worker process or the router.
"""

from __future__ import annotations

from typing import Any

from pdserve.kvtransfer.base import (
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    KVTransferConfig,
    KVTransferError,
)
from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
from pdserve.shared.engine.kv_pool import PagedKVPool

BACKENDS = ("fake", "zmq", "nccl", "cuda_ipc", "auto")


def make_kv_manager(
    backend: str,
    pool: PagedKVPool,
    worker_id: str,
    host: str = "127.0.0.1",
    config: KVTransferConfig | None = None,
    **options: Any,
) -> KVManager:
    """The worker's KV manager for `backend`.

    Options by backend: fake takes `hub` (a FakeTransferHub shared by the managers that should
    reach each other; a private one when omitted, which is enough for a worker warming up against
    itself); zmq takes `port`, `slab_bytes`, `max_slabs`; nccl takes `port`, `max_message_bytes`;
    cuda_ipc takes `port`; auto takes `port`, `fallback` ("zmq" or "nccl") and that fallback's
    options, and on a CPU pool is zmq (auto.worker_backend). `host` (all but fake) is bound and
    advertised: an address the peers can reach."""
    if backend == "fake":
        hub = options.pop("hub", None) or FakeTransferHub()
        _no_options(backend, options)
        return FakeKVManager(pool, worker_id, hub, config)
    if backend == "zmq":
        from pdserve.kvtransfer.zmq import ZmqKVManager

        return ZmqKVManager(pool, worker_id, config, host, **options)
    if backend == "nccl":
        from pdserve.kvtransfer.nccl import NcclKVManager

        return NcclKVManager(pool, worker_id, config, host, **options)
    if backend == "cuda_ipc":
        from pdserve.kvtransfer.cuda_ipc import CudaIpcKVManager

        return CudaIpcKVManager(pool, worker_id, config, host, **options)
    if backend == "auto":
        from pdserve.kvtransfer.auto import AutoKVManager, worker_backend

        if worker_backend(backend, pool.device.type) == "auto":
            return AutoKVManager(pool, worker_id, config, host, **options)
        options.pop("fallback", None)  # CPU workers keep zmq whatever the GPU fallback would be
        return make_kv_manager(
            worker_backend(backend, pool.device.type), pool, worker_id, host, config, **options
        )
    raise ValueError(f"unknown KV transfer backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _no_options(backend: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"the {backend} KV backend takes no option {', '.join(sorted(options))}")


__all__ = [
    "BACKENDS",
    "FakeKVManager",
    "FakeTransferHub",
    "KVManager",
    "KVPoll",
    "KVReceiver",
    "KVSender",
    "KVTransferConfig",
    "KVTransferError",
    "make_kv_manager",
]
