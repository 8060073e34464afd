"""The nccl backend: KV pages GPU to GPU over NCCL, one communicator per (sender, receiver) pair.

Control is control.py's, exactly as for zmq (Ready/Bound/Data/Ack/Abort and heartbeats over ZMQ);
this file is the data plane. Communicators (nccl_link.py) are made on first use and kept:

    sender manager                                         receiver manager
    first Ready bound for peer D:
      uid = ncclGetUniqueId(); link thread: init rank 0
      ── NcclHello(link id, uid) over ZMQ ───────────────▶  link thread: init rank 1
      per message: gather pages -> ring buffer (GPU),
      ── Data header over ZMQ ───────────────────────────▶  ncclRecv into a ring buffer
      ncclSend ═══════════════ bytes over NCCL ═════════▶   scatter into the pages, then `done`

A link serves one direction of one pair; several pairs run at once, each on its own thread,
streams and communicator, so a slow or dead pair does not hold up the others. A link that fails
(NCCL or CUDA error, peer dead, peer reports NcclLinkDown) fails the transfers that used it and is
replaced by a new one (new unique id) on the next bind. Device memory per link: two ring buffers
of `max_message_bytes`.

Why ctypes NCCL rather than torch.distributed: see nccl_lib.py. Importing this module needs
neither CUDA nor NCCL; making a manager needs both.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from pdserve.kvtransfer.base import KVTransferConfig, KVTransferError
from pdserve.kvtransfer.control import ControlPlaneManager
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.nccl_lib import NcclError, NcclLibrary, load_nccl
from pdserve.kvtransfer.nccl_link import NcclLink, RecvJob, SendJob
from pdserve.kvtransfer.plane_host import PlaneHost
from pdserve.kvtransfer.records import InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.wire import Data, NcclHello, NcclLinkDown
from pdserve.shared.engine.kv_pool import PagedKVPool

DEFAULT_MAX_MESSAGE_BYTES = 32 << 20
MAX_QUEUED_PER_LINK = 4  # messages handed to a sender link ahead of its NCCL sends


class NcclDataPlane(DataPlane):
    def __init__(self, host: PlaneHost, max_message_bytes: int, lib: NcclLibrary):
        super().__init__(host)
        self.max_message_bytes = max_message_bytes
        self.lib = lib
        self._out_links: dict[str, NcclLink] = {}  # peer -> link where this manager sends (rank 0)
        self._in_links: dict[str, NcclLink] = {}  # peer -> link where this manager receives (rank 1)
        self._reported_unknown: set[int] = set()

    def handlers(self) -> dict[type, Callable[[str, Any, list], None]]:
        return {NcclHello: self._on_hello, NcclLinkDown: self._on_link_down}

    def payload_error(self, msg: Data, payload: list) -> str | None:
        return f"{len(payload)} ZMQ frames with an NCCL data message" if payload else None

    # ------------------------------------------------------------------ links

    def on_bound(self, rec: OutboundTransfer) -> None:
        peer = rec.peer
        link = self._out_links.get(peer)
        if link is not None and link.failed is None:
            return
        try:
            uid = self.lib.unique_id()
        except NcclError as exc:
            self.host.fail_transfers_with(peer, f"cannot open an NCCL link: {exc}", inbound=False)
            return
        link = NcclLink(self, self.lib, peer, secrets.randbits(62), uid, 0, self.max_message_bytes)
        self._out_links[peer] = link
        self.host.send(peer, NcclHello(link.link_id, uid))
        link.start()

    def _on_hello(self, src: str, msg: NcclHello, payload: list) -> None:
        old = self._in_links.pop(src, None)
        if old is not None:
            self._fail_link(old, "the peer opened a new NCCL link")
        link = NcclLink(self, self.lib, src, msg.link, msg.uid, 1, self.max_message_bytes)
        self._in_links[src] = link
        link.start()

    def _on_link_down(self, src: str, msg: NcclLinkDown, payload: list) -> None:
        for table in (self._out_links, self._in_links):
            link = table.get(src)
            if link is not None and link.link_id == msg.link:
                self._fail_link(link, f"the peer dropped the NCCL link: {msg.reason}", tell=False)

    def _fail_link(self, link: NcclLink, reason: str, tell: bool = True) -> None:
        link.abort(reason)
        if tell:
            self.host.send(link.peer, NcclLinkDown(link.link_id, reason))
        self.link_failed(link)

    def link_failed(self, link: NcclLink) -> None:
        """I/O thread: the link is finished (failed, aborted or closed); fail what used it."""
        if link.reported:
            return
        link.reported = True
        table = self._out_links if link.rank == 0 else self._in_links
        if table.get(link.peer) is link:
            del table[link.peer]
        reason = link.failed or "NCCL link closed"
        for rec in list(link.recs):
            if isinstance(rec, OutboundTransfer):
                self.host.fail_outbound(rec, reason)
            else:
                self.host.fail_inbound(rec, reason)
        link.recs.clear()

    def _unknown_link(self, peer: str, msg: Data) -> None:
        if msg.link not in self._reported_unknown:
            self._reported_unknown.add(msg.link)
            reason = f"the receiver has no NCCL link {msg.link:x}"
            self.host.send(peer, NcclLinkDown(msg.link, reason))

    # ------------------------------------------------------------------ messages

    def submit(
        self, rec: OutboundTransfer, msg: Data, spec: MessageSpec, src_pages: list[int], ready_event: Any
    ) -> bool:
        link = self._out_links.get(rec.peer)
        if link is None or link.failed is not None:
            self.host.fail_outbound(rec, link.failed if link else f"no NCCL link to {rec.peer}")
            return True
        if link.pending >= MAX_QUEUED_PER_LINK:
            return False
        msg.link = link.link_id
        link.post(SendJob(rec, msg, spec, src_pages, ready_event))
        return True

    def receive(
        self,
        rec: InboundTransfer,
        msg: Data,
        spec: MessageSpec,
        dst_pages: list[int],
        payload: list,
        done: Callable[[], None],
    ) -> None:
        link = self._in_links.get(rec.peer)
        if link is None or link.link_id != msg.link or link.failed is not None:
            self._unknown_link(rec.peer, msg)
            self.host.fail_inbound(rec, f"no NCCL link {msg.link:x} from {rec.peer}")
            return
        link.post(RecvJob(rec, msg, spec, dst_pages, done))

    def discard(self, peer: str, msg: Data, payload: list) -> None:
        link = self._in_links.get(peer)
        if link is None or link.link_id != msg.link or link.failed is not None:
            self._unknown_link(peer, msg)
            return
        spec = MessageSpec(msg.first_page, msg.num_pages, msg.layer_begin, msg.layer_end)
        link.post(RecvJob(None, msg, spec, [], None))  # keeps the pair's sends and receives in step

    def on_peer_lost(self, peer: str) -> None:
        for table in (self._out_links, self._in_links):
            link = table.get(peer)
            if link is not None:
                self._fail_link(link, f"KV peer {peer} lost", tell=False)

    def close(self) -> None:
        for link in list(self._out_links.values()) + list(self._in_links.values()):
            self._fail_link(link, "KV manager closed", tell=False)


class NcclKVManager(ControlPlaneManager):
    """KV manager of the nccl backend: the pool must be on a CUDA device. `host` is bound and
    advertised for the ZMQ control channel; NCCL finds its own transport (NVLink, PCIe, network)."""

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        config: KVTransferConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if pool.device.type != "cuda":
            raise KVTransferError(f"the nccl KV backend needs a pool on a CUDA device, not {pool.device}")
        try:
            lib = load_nccl()
        except NcclError as exc:
            raise KVTransferError(str(exc)) from exc
        super().__init__(
            pool,
            worker_id,
            config,
            host,
            port,
            max_message_bytes=max_message_bytes,
            make_plane=lambda host: NcclDataPlane(host, max_message_bytes, lib),
        )
