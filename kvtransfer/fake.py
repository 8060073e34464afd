"""The fake backend: in-process and instant, for the roles' tests and for warm-up.

Managers register in a `FakeTransferHub` that the test (or the warming-up worker) creates and
passes to each of them; endpoints are "fake://<worker_id>". A sender and a receiver meet in the hub
under (sender endpoint, receiver endpoint, rid). Pages are copied synchronously inside `send()` (or
inside `init()` for sends that came first), so there is no thread and no waiting; everything else
follows base.py's rules exactly, and the states move as on a real backend:

    sender:   Bootstrapping -> WaitingForInput (receiver's init seen) -> Transferring (first send)
              -> Success (last send copied)
    receiver: Bootstrapping -> WaitingForInput (init done and a sender exists) -> Transferring
              -> Success (first_output readable)

Failures: abort() on either side fails both (the other side's reason says who aborted); an abort
before the other side exists is kept until it is made (it is then Failed at once), for at most
`transfer_timeout_s`; `transfer_timeout_s` is checked on poll(); closing a manager fails every
transfer it takes part in, on both sides, like a peer that died. first_output goes through msgpack
like on the wire, so a value a real backend could not carry fails here too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.base import (
    HeadRange,
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    KVTransferConfig,
    KVTransferError,
)
from pdserve.kvtransfer.head_slice import KVRegion
from pdserve.kvtransfer.layout import KVLayout, layout_mismatch
from pdserve.kvtransfer.state import TransferState, check_send_args, msgpack_roundtrip
from pdserve.shared.engine.kv_pool import PagedKVPool

_Key = tuple[str, str, str]  # (sender endpoint, receiver endpoint, rid)


@dataclass(eq=False)
class _Link:
    """One rid between one sender and one receiver manager, as the hub sees it."""

    key: _Key
    sender: FakeSender | None = None
    receiver: FakeReceiver | None = None
    # An abort from a side made before its peer existed: (reason, expiry).
    tombstone: tuple[str, float] | None = None


class FakeTransferHub:
    """Where fake managers find each other; one per test (or per warming-up process).

    All hub operations hold one lock, so roles running in different threads may share a hub."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._managers: dict[str, FakeKVManager] = {}
        self._links: dict[_Key, _Link] = {}

    def register(self, manager: FakeKVManager) -> None:
        with self.lock:
            if manager.endpoint in self._managers:
                raise KVTransferError(f"fake endpoint {manager.endpoint} is already registered")
            self._managers[manager.endpoint] = manager

    def manager(self, endpoint: str) -> FakeKVManager:
        with self.lock:
            manager = self._managers.get(endpoint)
            if manager is None:
                raise KVTransferError(f"no fake KV manager at {endpoint!r}")
            return manager

    def open_links(self) -> int:
        """Links still held (for leak checks): 0 once every transfer is final on both sides."""
        with self.lock:
            self._expire_tombstones()
            return len(self._links)

    def link(self, key: _Key) -> _Link:
        self._expire_tombstones()
        return self._links.setdefault(key, _Link(key))

    def drop(self, link: _Link) -> None:
        if self._links.get(link.key) is link:
            del self._links[link.key]

    def links_of(self, endpoint: str) -> list[_Link]:
        return [link for key, link in self._links.items() if endpoint in key[:2]]

    def unregister(self, manager: FakeKVManager) -> None:
        self._managers.pop(manager.endpoint, None)

    def _expire_tombstones(self) -> None:
        now = time.monotonic()
        for key in [k for k, link in self._links.items() if link.tombstone and link.tombstone[1] < now]:
            del self._links[key]


class _FakeSide:
    """What the fake sender and receiver share: state, reason, the link, the hub, and the pool it
    reads or writes (the manager's, or a head slice of it)."""

    def __init__(self, manager: FakeKVManager, rid: str, link: _Link, pool: PagedKVPool):
        self.rid = rid
        self._manager = manager
        self._pool = pool
        self._hub = manager.hub
        self._link = link
        self._state = TransferState(manager.config.transfer_timeout_s)

    @property
    def failure_reason(self) -> str | None:  # type: ignore[override]
        return self._state.reason

    def poll(self) -> KVPoll:
        with self._hub.lock:
            if self._state.expired(time.monotonic()):
                _fail_link(self._hub, self._link, self, self._state.timeout_reason(), "peer timed out: ")
            return self._state.status


class FakeSender(_FakeSide, KVSender):
    def __init__(self, manager: FakeKVManager, rid: str, link: _Link, pool: PagedKVPool):
        super().__init__(manager, rid, link, pool)
        self._queued: list[tuple[list[int], bool, dict[str, Any] | None]] = []
        self._last_sent = False
        self._copied = 0  # pages of the request copied so far

    def send(self, pages: list[int], is_last: bool, first_output: dict[str, Any] | None = None) -> None:
        check_send_args(self.rid, self._last_sent, is_last, first_output)
        self._last_sent = is_last
        with self._hub.lock:
            if self._state.is_final:
                return
            self._queued.append(([int(p) for p in pages], is_last, first_output))
            receiver = self._link.receiver
            if receiver is not None and receiver._pages is not None:
                self._flush(receiver)

    def _flush(self, receiver: FakeReceiver) -> None:
        """Copies every queued send into the receiver's pages (hub lock held)."""
        assert receiver._pages is not None
        for pages, is_last, first_output in self._queued:
            end = self._copied + len(pages)
            if end > len(receiver._pages):
                reason = f"{end} pages sent, the receiver allocated {len(receiver._pages)}"
                _fail_link(self._hub, self._link, self, reason, "")
                return
            _copy_pages(self._pool, pages, receiver._pool, receiver._pages[self._copied : end])
            self._copied = end
            self._state.advance(KVPoll.Transferring)
            receiver._state.advance(KVPoll.Transferring)
            if is_last:
                receiver._first_output = msgpack_roundtrip(first_output)
                self._state.advance(KVPoll.Success)
                receiver._state.advance(KVPoll.Success)
                self._hub.drop(self._link)
        self._queued.clear()

    def abort(self, reason: str = "aborted by the prefill worker") -> None:
        with self._hub.lock:
            _fail_link(self._hub, self._link, self, reason, "sender aborted: ")


class FakeReceiver(_FakeSide, KVReceiver):
    def __init__(self, manager: FakeKVManager, rid: str, link: _Link, pool: PagedKVPool):
        super().__init__(manager, rid, link, pool)
        self._pages: list[int] | None = None
        self._first_output: dict[str, Any] | None = None

    def init(self, pages: list[int]) -> None:
        if self._pages is not None:
            raise RuntimeError(f"KV transfer {self.rid}: init() called twice")
        with self._hub.lock:
            self._pages = [int(p) for p in pages]
            if not self._state.is_final and self._link.sender is not None:
                self._meet_sender()

    def _meet_sender(self) -> None:
        """Both sides exist and init() was called: check layouts, flush early sends (hub lock held)."""
        sender = self._link.sender
        assert sender is not None
        reason = layout_mismatch(KVLayout.of(sender._pool).to_wire(), KVLayout.of(self._pool).to_wire())
        if reason is not None:
            _fail_link(self._hub, self._link, self, reason, "")
            return
        sender._state.advance(KVPoll.WaitingForInput)
        self._state.advance(KVPoll.WaitingForInput)
        if sender._queued:
            sender._flush(self)

    @property
    def first_output(self) -> dict[str, Any] | None:
        return self._first_output if self._state.status == KVPoll.Success else None

    def abort(self, reason: str = "aborted by the decode worker") -> None:
        with self._hub.lock:
            _fail_link(self._hub, self._link, self, reason, "receiver aborted: ")


def _fail_link(hub: FakeTransferHub, link: _Link, side: _FakeSide, reason: str, peer_prefix: str) -> None:
    """Fails `side` with reason and its peer with peer_prefix + reason; keeps a tombstone when the
    peer does not exist yet (hub lock held)."""
    if not side._state.fail(reason):
        return
    peer = link.receiver if side is link.sender else link.sender
    if peer is not None:
        peer._state.fail(peer_prefix + reason)
        hub.drop(link)
    else:
        link.tombstone = (peer_prefix + reason, time.monotonic() + side._state.timeout_s)


def _copy_pages(src: PagedKVPool, src_pages: list[int], dst: PagedKVPool, dst_pages: list[int]) -> None:
    if not src_pages:
        return
    src_idx = torch.tensor(src_pages, dtype=torch.long, device=src.device)
    dst_idx = torch.tensor(dst_pages, dtype=torch.long, device=dst.device)
    for layer in range(src.shape.num_layers):
        for plane in range(src.shape.num_planes):  # K and V, or the one plane of an MLA pool
            dst.kv[layer, plane][dst_idx] = src.kv[layer, plane][src_idx].to(dst.device)


class FakeKVManager(KVManager):
    moves_head_slices = True

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        hub: FakeTransferHub,
        config: KVTransferConfig | None = None,
    ):
        super().__init__(pool, worker_id, config)
        self.hub = hub
        self.endpoint = f"fake://{worker_id}"
        self._closed = False
        hub.register(self)

    def make_sender(self, rid: str, dest_endpoint: str, heads: HeadRange | None = None) -> KVSender:
        pool = KVRegion.of(self.pool, heads).pool
        with self.hub.lock:
            self._check_open()
            self.hub.manager(dest_endpoint)
            link = self.hub.link((self.endpoint, dest_endpoint, rid))
            if link.sender is not None:
                raise KVTransferError(f"a transfer of rid {rid!r} to {dest_endpoint} is already in progress")
            sender = link.sender = FakeSender(self, rid, link, pool)
            if link.tombstone is not None:
                _fail_link(self.hub, link, sender, link.tombstone[0], "")
                self.hub.drop(link)
            elif link.receiver is not None and link.receiver._pages is not None:
                link.receiver._meet_sender()
            return sender

    def make_receiver(self, rid: str, src_endpoint: str, heads: HeadRange | None = None) -> KVReceiver:
        pool = KVRegion.of(self.pool, heads).pool
        with self.hub.lock:
            self._check_open()
            self.hub.manager(src_endpoint)
            link = self.hub.link((src_endpoint, self.endpoint, rid))
            if link.receiver is not None:
                raise KVTransferError(f"a transfer of rid {rid!r} from {src_endpoint} is already in progress")
            receiver = link.receiver = FakeReceiver(self, rid, link, pool)
            if link.tombstone is not None:
                _fail_link(self.hub, link, receiver, link.tombstone[0], "")
                self.hub.drop(link)
            return receiver

    def close(self) -> None:
        """Fails every transfer this manager takes part in, on both sides (as if it died)."""
        with self.hub.lock:
            if self._closed:
                return
            self._closed = True
            for link in self.hub.links_of(self.endpoint):
                for side in (link.sender, link.receiver):
                    if side is not None:
                        mine = side._manager is self
                        side._state.fail("KV manager closed" if mine else f"KV peer {self.endpoint} closed")
                self.hub.drop(link)
            self.hub.unregister(self)

    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError("KV manager closed")
