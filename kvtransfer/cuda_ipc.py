"""The cuda_ipc backend: peers on one host write KV pages straight into each other's pools.

Control is control.py's, exactly as for zmq and nccl (Ready/Bound/Data/Ack/Abort, heartbeats,
timeouts over ZMQ); this file is the data plane. Each receiving manager exports its pool once
(ipc_pool.py: a CUDA IPC handle; CPU pools: shared memory) and keeps a write gate (ipc_gate.py):

    receiver manager                                     sender manager
    init(pages): open a gate slot for the nonce
      ── Ready(plane={ipc: pool export, gate, slot, pages}) ─▶  first time for this peer (or a new
                                                         export after a restart): map its pool and
                                                         attach its gate, once; keep them
                                                         per chunk (one message): under the
                                                         transfer's lock and the gate slot's lock,
                                                         one kernel copies every page x layer of
                                                         the chunk into the receiver's page ids
                                                         (page_move.py), then stream.synchronize()
    the bytes are in place: count them  ◀── Data(via="cuda_ipc") header
                                                         after the last header: Success
    ... last Data: Success, Ack ───────────────────────▶ (nothing left to learn from it)

No staging, no host copy: the header leaves only after the copy finished, so its arrival means the
bytes are there; and the sender is done with its pages when its last copy is, one hop before the
receiver's Ack could say so. Same GPU (two processes) or two GPUs of one host with peer access.

Rules (base.py's, across two processes):
- A receiver's pages are written only while its gate slot is open: the slot opens at init() and
  closes, as the state's closer, before the receiver's state becomes final; closing waits for a
  copy in progress. So after abort() returns, or once poll() shows Success or Failed, nothing
  writes into those pages; a killed sender's lock goes with its process.
- A sender reads its pages only under its transfer's lock while not final (as zmq does).
- The mapped peer pool and gate are dropped when the peer is lost (connection dropped, silent),
  idle (no transfer for a minute: its connection is closed too), replaced by a new export, or at
  close(): a dead receiver's GPU memory is not held by its senders.

`CudaIpcKVManager` refuses peers it cannot reach (another host, an invisible GPU): their transfers
fail with the reason. `auto` (auto.py) falls back to another plane for those pairs instead.

    manager = CudaIpcKVManager(pool, "decode-0")      # or make_kv_manager("cuda_ipc", pool, "decode-0")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.base import KVTransferConfig, KVTransferError
from pdserve.kvtransfer.control import ControlPlaneManager
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.ipc_gate import GateError, GateTable, GateView
from pdserve.kvtransfer.ipc_pool import PoolShareError, export_pool, here, map_pool, unreachable_reason
from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.page_move import move_kv_pages
from pdserve.kvtransfer.plane_host import PlaneHost
from pdserve.kvtransfer.records import InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.wire import Data
from pdserve.shared.engine.kv_pool import PagedKVPool

logger = logging.getLogger(__name__)

VIA = "cuda_ipc"
ONE_MESSAGE_PER_CHUNK = 1 << 62  # no staging buffer bounds a message: one kernel per send() chunk
MIN_GATE_SLOTS = 1024


@dataclass
class IpcExport:
    """A receiving manager's shared side: its pool export and its write gate."""

    pool: dict[str, Any]
    gate: GateTable

    @classmethod
    def create(cls, pool: PagedKVPool, wait_s: float) -> IpcExport:
        try:
            shared = export_pool(pool)
            # A transfer holds at least one page, so this many slots never run out first.
            gate = GateTable(max(MIN_GATE_SLOTS, pool.num_pages), wait_s)
        except (PoolShareError, GateError) as exc:
            raise KVTransferError(f"the cuda_ipc KV backend cannot start: {exc}") from exc
        return cls(shared, gate)


@dataclass(eq=False)
class PeerPool:
    """A receiving peer's pool and gate as mapped by this (sending) manager."""

    token: str
    kv: torch.Tensor
    gate: GateView

    def release(self) -> None:
        self.gate.close()
        self.kv = torch.empty(0)  # the last reference: the IPC mapping (or file mapping) closes


class CudaIpcDataPlane(DataPlane):
    """`required`: a peer it cannot reach fails its transfers (cuda_ipc); False lets a wrapping plane
    fall back (auto), and a receiver that cannot open a gate slot then offers nothing."""

    def __init__(self, host: PlaneHost, export: IpcExport, required: bool = True):
        super().__init__(host)
        self.export = export
        self.required = required
        self.here = here(host.pool)
        self.stream = None
        if host.pool.device.type == "cuda":
            self.stream = torch.cuda.Stream(host.pool.device)
            # Compiles the copy kernel now, not inside a request's first copy (under its gate lock):
            # page 0 onto itself, the page nobody owns.
            zero = torch.zeros(1, dtype=torch.int64, device=host.pool.device)
            move_kv_pages(host.pool.kv, zero, host.pool.kv, zero, 0, host.pool.kv.shape[0])
            torch.cuda.synchronize(host.pool.device)
        self._peers: dict[str, PeerPool] = {}  # receiving peer -> its mapped pool (sender side)
        self._unreachable: dict[tuple[str, str], str] = {}  # (peer, export token) -> why
        self._offered: set[bytes] = set()  # nonces of inbound transfers with an open gate slot

    # ------------------------------------------------------------------ receiver side

    def offer(self, rec: InboundTransfer) -> dict[str, Any] | None:
        gate = self.export.gate
        slot = gate.open(rec.nonce)
        if slot is None:
            if self.required:
                self.host.fail_inbound(rec, f"cuda_ipc: all {gate.num_slots} write-gate slots are in use")
            return None
        nonce = rec.nonce

        def close() -> None:
            self._offered.discard(nonce)
            gate.close(slot)

        self._offered.add(nonce)
        if not rec.state.set_closer(close):
            close()  # aborted meanwhile
            return None
        return {"ipc": {"pool": self.export.pool, "gate": gate.locator(), "slot": slot, "pages": rec.pages}}

    def payload_error(self, msg: Data, payload: list) -> str | None:
        if msg.via != VIA:
            return f"a data message sent {msg.via or 'with bytes'} to a cuda_ipc receiver"
        return f"{len(payload)} frames with a cuda_ipc data message" if payload else None

    def receive(
        self,
        rec: InboundTransfer,
        msg: Data,
        spec: MessageSpec,
        dst_pages: list[int],
        payload: list,
        done: Callable[[], None],
    ) -> None:
        if rec.nonce not in self._offered:
            self.host.fail_inbound(rec, "cuda_ipc data for a transfer whose pages were not offered")
            return
        done()  # the sender wrote the pages (through the open gate) before it sent the header

    def discard(self, peer: str, msg: Data, payload: list) -> None:
        pass  # nothing to consume: the bytes never travel with the header

    # ------------------------------------------------------------------ sender side

    def reach(self, rec: OutboundTransfer) -> str | None:
        """Maps the receiver's pool for `rec` if needed; why it cannot be written from here, or None."""
        ipc = (rec.offer or {}).get("ipc")
        if not isinstance(ipc, dict):
            return "the receiver offers no shared pool"
        shared = ipc["pool"]
        token = shared.get("token")
        known = self._peers.get(rec.peer)
        if known is not None and known.token == token:
            return self._offer_error(rec, ipc, known)
        if known is not None:  # a new export at that endpoint: the peer restarted, its old pool is gone
            del self._peers[rec.peer]
            known.release()
        why = self._unreachable.get((rec.peer, token))
        if why is not None:
            return why
        why = unreachable_reason(shared, self.here)
        mapped = None
        if why is None:
            try:
                mapped = PeerPool(
                    token, map_pool(shared, self.host.pool), GateView.attach(ipc["gate"], self.wait_s)
                )
            except (PoolShareError, GateError) as exc:
                why = str(exc)
        if mapped is None:
            self._unreachable[(rec.peer, token)] = why or "unknown"
            return why
        self._peers[rec.peer] = mapped
        logger.info("cuda_ipc: mapped the KV pool of %s (%s)", rec.peer, shared.get("kind"))
        return self._offer_error(rec, ipc, mapped)

    @property
    def wait_s(self) -> float:
        return self.host.config.heartbeat_timeout_s

    def _offer_error(self, rec: OutboundTransfer, ipc: dict[str, Any], peer: PeerPool) -> str | None:
        pages = ipc.get("pages")
        if not isinstance(pages, list) or len(pages) != rec.dest_num_pages:
            return "the receiver's page list does not match its page count"
        num_pages = peer.kv.shape[2]
        if not all(isinstance(p, int) and 0 <= p < num_pages for p in pages) or len(set(pages)) != len(pages):
            return "the receiver's page ids are out of its pool or repeated"
        return None

    def on_bound(self, rec: OutboundTransfer) -> None:
        why = self.reach(rec)
        if why is not None:
            self.host.fail_outbound(rec, f"cuda_ipc cannot reach {rec.peer}: {why}")

    def message_bytes(self, rec: OutboundTransfer) -> int:
        return ONE_MESSAGE_PER_CHUNK

    def done_when_written(self, rec: OutboundTransfer) -> bool:
        return True

    def submit(
        self, rec: OutboundTransfer, msg: Data, spec: MessageSpec, src_pages: list[int], ready_event: Any
    ) -> bool:
        msg.via = VIA
        if spec.num_pages:
            ipc = rec.offer["ipc"] if rec.offer else {}
            peer = self._peers.get(rec.peer)
            if peer is None or peer.token != ipc.get("pool", {}).get("token"):
                self.host.fail_outbound(rec, f"the KV pool of {rec.peer} is no longer mapped")
                return True
            dst_pages = ipc["pages"][spec.first_page : spec.first_page + spec.num_pages]
            with rec.state.lock:
                if rec.state.is_final:
                    return True
                with peer.gate.writing(ipc["slot"], rec.nonce or b"") as allowed:
                    if not allowed:
                        self.host.fail_outbound(rec, "the receiver no longer takes this transfer's pages")
                        return True
                    self._copy(src_pages, peer.kv, dst_pages, spec, ready_event)
        elif rec.state.is_final:
            return True
        self.host.send(rec.peer, msg)
        return True

    def _copy(
        self,
        src_pages: list[int],
        dst_kv: torch.Tensor,
        dst_pages: list[int],
        spec: MessageSpec,
        ready_event: Any,
    ) -> None:
        """One launch for the whole message; finished (synchronized) when it returns."""
        pool = self.host.pool
        if self.stream is None:
            move_kv_pages(pool.kv, _index(src_pages, pool.device), dst_kv, _index(dst_pages, pool.device),
                          spec.layer_begin, spec.layer_end)  # fmt: skip
            return
        with torch.cuda.stream(self.stream):
            if ready_event is not None:
                self.stream.wait_event(ready_event)  # KV written by the caller's kernels in flight
            move_kv_pages(pool.kv, _index(src_pages, pool.device), dst_kv, _index(dst_pages, pool.device),
                          spec.layer_begin, spec.layer_end)  # fmt: skip
        self.stream.synchronize()

    # ------------------------------------------------------------------ peers

    def _forget(self, peer: str) -> None:
        mapped = self._peers.pop(peer, None)
        if mapped is not None:
            mapped.release()
        for key in [k for k in self._unreachable if k[0] == peer]:
            del self._unreachable[key]

    def on_peer_lost(self, peer: str) -> None:
        self._forget(peer)

    def on_peer_idle(self, peer: str) -> None:
        self._forget(peer)

    def stats(self) -> dict[str, int]:
        return {"mapped_pools": len(self._peers), "gate_slots": self.export.gate.open_slots()}

    def close(self) -> None:
        for peer in list(self._peers):
            self._forget(peer)
        self.export.gate.shutdown()


def _index(pages: list[int], device: torch.device) -> torch.Tensor:
    idx = torch.tensor(pages, dtype=torch.int64)
    return idx.to(device, non_blocking=True) if device.type == "cuda" else idx


class CudaIpcKVManager(ControlPlaneManager):
    """KV manager of the cuda_ipc backend (peers on this host). `host` is bound and advertised for
    the ZMQ control channel. CUDA pools share through CUDA IPC; CPU pools through shared memory."""

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        config: KVTransferConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        config = config or KVTransferConfig()
        export = IpcExport.create(pool, config.heartbeat_timeout_s)
        try:
            super().__init__(
                pool,
                worker_id,
                config,
                host,
                port,
                max_message_bytes=ONE_MESSAGE_PER_CHUNK,
                make_plane=lambda host: CudaIpcDataPlane(host, export),
            )
        except BaseException:
            export.gate.shutdown()
            raise
