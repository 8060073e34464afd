"""The auto backend: per pair of workers, cuda_ipc where it can work, else a fallback plane.

Two choices, one per level:

- Worker level (`worker_backend`, pure): what `--kv-transfer-backend auto` makes a worker run.
  CPU pools get zmq (the host-staged backend CPU workers always used); CUDA pools get `auto`
  below, with zmq as its fallback unless nccl is asked for.
- Pair level (`AutoDataPlane`, on the sender when it binds to a receiver's Ready): cuda_ipc when
  the receiver offered its pool (same boot id, a GPU this process sees and can reach, a mapping that
  opens), else the fallback plane (zmq across hosts or containers; nccl when configured). The choice
  is remembered per (peer, export) and logged once per pair; each transfer keeps the plane it was
  bound with. Data headers say which plane carried them (`Data.via`), so the receiver hands them to
  the right one. Both managers of a pair must have the same fallback.

    manager = make_kv_manager("auto", pool, "prefill-0")              # CUDA pool: AutoKVManager
    manager = make_kv_manager("auto", pool, "prefill-0", fallback="nccl")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pdserve.kvtransfer.base import KVTransferConfig, KVTransferError
from pdserve.kvtransfer.control import ControlPlaneManager
from pdserve.kvtransfer.cuda_ipc import VIA, CudaIpcDataPlane, IpcExport
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.plane_host import PlaneHost
from pdserve.kvtransfer.records import InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.wire import Data
from pdserve.shared.engine.kv_pool import PagedKVPool

logger = logging.getLogger(__name__)

FALLBACKS = ("zmq", "nccl")


def worker_backend(requested: str, device_type: str) -> str:
    """The backend a worker runs for `--kv-transfer-backend requested` on a `device_type` pool."""
    if requested != "auto":
        return requested
    return "auto" if device_type == "cuda" else "zmq"


class AutoDataPlane(DataPlane):
    """cuda_ipc per pair where it reaches, else `fallback`; one control plane for both."""

    def __init__(self, host: PlaneHost, ipc: CudaIpcDataPlane, fallback: DataPlane, fallback_name: str):
        super().__init__(host)
        self.ipc = ipc
        self.fallback = fallback
        self.fallback_name = fallback_name
        self._choices: dict[str, tuple[str, str]] = {}  # peer -> (export token, plane), as last logged

    def _plane(self, via: str) -> DataPlane:
        return self.ipc if via == VIA else self.fallback

    def handlers(self) -> dict[type, Callable[[str, Any, list], None]]:
        return {**self.ipc.handlers(), **self.fallback.handlers()}

    # ------------------------------------------------------------------ receiver side

    def offer(self, rec: InboundTransfer) -> dict[str, Any] | None:
        return self.ipc.offer(rec)  # None (full gate) only means: the sender falls back

    def payload_error(self, msg: Data, payload: list) -> str | None:
        return self._plane(msg.via).payload_error(msg, payload)

    def receive(
        self,
        rec: InboundTransfer,
        msg: Data,
        spec: MessageSpec,
        dst_pages: list[int],
        payload: list,
        done: Callable[[], None],
    ) -> None:
        self._plane(msg.via).receive(rec, msg, spec, dst_pages, payload, done)

    def discard(self, peer: str, msg: Data, payload: list) -> None:
        self._plane(msg.via).discard(peer, msg, payload)

    # ------------------------------------------------------------------ sender side

    def on_bound(self, rec: OutboundTransfer) -> None:
        why = self.ipc.reach(rec)
        rec.via = VIA if why is None else self.fallback_name
        token = ((rec.offer or {}).get("ipc") or {}).get("pool", {}).get("token", "")
        if self._choices.get(rec.peer) != (token, rec.via):
            self._choices[rec.peer] = (token, rec.via)
            if why is None:
                logger.info("KV transfers to %s: cuda_ipc (same host, pool mapped)", rec.peer)
            else:
                logger.info("KV transfers to %s: %s (cuda_ipc: %s)", rec.peer, rec.via, why)
        self._plane(rec.via).on_bound(rec)

    def message_bytes(self, rec: OutboundTransfer) -> int:
        return self._plane(rec.via).message_bytes(rec)

    def done_when_written(self, rec: OutboundTransfer) -> bool:
        return self._plane(rec.via).done_when_written(rec)

    def submit(
        self, rec: OutboundTransfer, msg: Data, spec: MessageSpec, src_pages: list[int], ready_event: Any
    ) -> bool:
        return self._plane(rec.via).submit(rec, msg, spec, src_pages, ready_event)

    def choices(self) -> dict[str, str]:
        return {peer: via for peer, (_, via) in self._choices.items()}

    # ------------------------------------------------------------------ peers

    def on_peer_lost(self, peer: str) -> None:
        self._choices.pop(peer, None)
        self.ipc.on_peer_lost(peer)
        self.fallback.on_peer_lost(peer)

    def on_peer_idle(self, peer: str) -> None:
        self._choices.pop(peer, None)
        self.ipc.on_peer_idle(peer)
        self.fallback.on_peer_idle(peer)

    def stats(self) -> dict[str, int]:
        return {**self.fallback.stats(), **self.ipc.stats()}

    def close(self) -> None:
        try:
            self.fallback.close()
        finally:
            self.ipc.close()


class AutoKVManager(ControlPlaneManager):
    """KV manager of the auto backend. `fallback`: "zmq" (options `slab_bytes`, `max_slabs`) or
    "nccl" (option `max_message_bytes`), for the pairs cuda_ipc cannot serve."""

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        config: KVTransferConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        fallback: str = "zmq",
        **fallback_options: Any,
    ):
        config = config or KVTransferConfig()
        make_fallback, message_bytes = _fallback_plane(fallback, pool, fallback_options)
        export = IpcExport.create(pool, config.heartbeat_timeout_s)
        try:
            super().__init__(
                pool,
                worker_id,
                config,
                host,
                port,
                max_message_bytes=message_bytes,
                make_plane=lambda host: AutoDataPlane(
                    host, CudaIpcDataPlane(host, export, required=False), make_fallback(host), fallback
                ),
            )
        except BaseException:
            export.gate.shutdown()
            raise


def _fallback_plane(
    name: str, pool: PagedKVPool, options: dict[str, Any]
) -> tuple[Callable[[PlaneHost], DataPlane], int]:
    if name == "zmq":
        from pdserve.kvtransfer.zmq import DEFAULT_MAX_SLABS, DEFAULT_SLAB_BYTES, ZmqDataPlane

        slab_bytes = options.pop("slab_bytes", DEFAULT_SLAB_BYTES)
        max_slabs = options.pop("max_slabs", DEFAULT_MAX_SLABS)
        _no_options(name, options)
        return (lambda host: ZmqDataPlane(host, slab_bytes, max_slabs)), slab_bytes
    if name == "nccl":
        from pdserve.kvtransfer.nccl import DEFAULT_MAX_MESSAGE_BYTES, NcclDataPlane
        from pdserve.kvtransfer.nccl_lib import NcclError, load_nccl

        message_bytes = options.pop("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
        _no_options(name, options)
        if pool.device.type != "cuda":
            raise KVTransferError(f"the nccl fallback needs a pool on a CUDA device, not {pool.device}")
        try:
            lib = load_nccl()
        except NcclError as exc:
            raise KVTransferError(str(exc)) from exc
        return (lambda host: NcclDataPlane(host, message_bytes, lib)), message_bytes
    raise ValueError(
        f"unknown fallback {name!r} for the auto KV backend: choose one of {', '.join(FALLBACKS)}"
    )


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"the auto KV backend's {name} fallback takes no option {', '.join(sorted(options))}")
