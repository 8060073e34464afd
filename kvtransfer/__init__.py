"""pdserve.kvtransfer: how a prefill worker's KV pages reach a decode worker.

`base.py` is the interface (KVManager, KVSender, KVReceiver, ordered KVPoll, the rules). Backends:
`fake` (in-process, instant: tests and warm-up), `zmq` (host-staged zero-copy frames over TCP) and
`nccl` (GPU to GPU; same control plane as zmq). `make_kv_manager` builds one by name.
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

BACKENDS = ("fake", "zmq", "nccl")


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
    itself); zmq takes `port`, `slab_bytes`, `max_slabs`; nccl takes `port`, `max_message_bytes`.
    `host` (zmq, nccl) is bound and advertised: an address the peers can reach."""
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
