"""The transfer tables of one manager of the control-plane backends, and every rule about them.

Runs on the manager's I/O thread only (control.py): registration of handles, binding a sender to
its receiver's Ready, cutting send() chunks into messages for the data plane, accounting for what
arrives, acks, aborts, timeouts, early messages, and dropping a transfer's state once it is final
and the peer has been told (or cannot be). The life of a transfer on the wire is in control.py.
It touches no socket and no thread: messages go out through a PeerLink and bytes through the data
plane (plane_host.py), so the rules run in tests message by message.

Tables: senders by (peer, rid) until bound and then also by the receiver's nonce; receivers by
nonce and by (peer, rid); early messages by (peer, rid), kept `transfer_timeout_s`; nonces of
dropped transfers for FINISHED_TTL_S (stale data is answered with one Abort, not one per message).
Whoever makes a transfer final (here, or the worker through abort()) tells the peer and drops it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import KVPoll, KVTransferConfig, KVTransferError
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.handles import CLOSED
from pdserve.kvtransfer.layout import (
    MessageSpec,
    data_error,
    data_header,
    layout_mismatch,
    plan_messages,
)
from pdserve.kvtransfer.plane_host import PeerLink
from pdserve.kvtransfer.records import Chunk, InboundTransfer, OutboundTransfer

FINISHED_TTL_S = 30.0


class Transfers:
    """`plane` is set by the manager once made (it needs the manager, which holds this table);
    `closed` once its loop ends: registrations then fail as closed."""

    plane: DataPlane

    def __init__(self, peers: PeerLink, config: KVTransferConfig):
        self.peers = peers
        self.config = config
        self.closed = False
        self._out: dict[tuple[str, str], OutboundTransfer] = {}
        self._out_by_nonce: dict[bytes, OutboundTransfer] = {}
        self._in: dict[bytes, InboundTransfer] = {}
        self._in_by_key: dict[tuple[str, str], InboundTransfer] = {}
        self._early_out: dict[tuple[str, str], tuple[wire.Ready | wire.Abort, float]] = {}
        self._early_in: dict[tuple[str, str], tuple[wire.Abort, float]] = {}
        self._finished: dict[bytes, float] = {}
        self._sending: dict[OutboundTransfer, None] = {}  # bound, with messages still to submit

    def handlers(self) -> dict[type, Callable[[str, Any, list], None]]:
        """The table's part of the manager's dispatch: message type -> handler(src, msg, payload)."""
        return {
            wire.Ready: self.on_ready,
            wire.Bound: self.on_bound,
            wire.Data: self.on_data,
            wire.Ack: self.on_ack,
            wire.Abort: self.on_abort,
        }

    @property
    def sending(self) -> bool:
        return bool(self._sending)

    def stats(self) -> dict[str, int]:
        return {
            "senders": len(self._out),
            "receivers": len(self._in),
            "early": len(self._early_out) + len(self._early_in),
            "sending": len(self._sending),
            "peer_refs": self.peers.active_count(),
        }

    def expire(self, now: float) -> None:
        """Timers: transfer deadlines, early messages, remembered nonces."""
        for rec in [r for r in self._out.values() if r.state.expired(now)]:
            self.fail_outbound(rec, rec.state.timeout_reason())
        for rec in [r for r in self._in.values() if r.state.expired(now)]:
            self.fail_inbound(rec, rec.state.timeout_reason())
        for key, (msg, expiry) in list(self._early_out.items()):
            if expiry < now:
                del self._early_out[key]
                if isinstance(msg, wire.Ready):
                    reason = f"no sender for this request within {self.config.transfer_timeout_s:g} s"
                    self.peers.send(key[0], wire.Abort(msg.rid, msg.nonce, reason, False))
        for key in [k for k, (_, expiry) in self._early_in.items() if expiry < now]:
            del self._early_in[key]
        for nonce in [n for n, expiry in self._finished.items() if expiry < now]:
            del self._finished[nonce]

    def forget_peer(self, peer: str, reason: str) -> None:
        """The peer is dead: fail everything with it, forget its early messages."""
        self.fail_transfers_with(peer, reason)
        for table in (self._early_out, self._early_in):
            for key in [k for k in table if k[0] == peer]:
                del table[key]

    # ------------------------------------------------------------------ commands from the handles

    def register_out(self, rec: OutboundTransfer) -> None:
        error = self._register_error(rec.key, self._out)
        if error is None:
            try:
                self.peers.retain(rec.peer, time.monotonic())
            except KVTransferError as exc:
                error = str(exc)
        if error is not None:
            rec.state.fail(error)
            rec.dropped = True
            return
        self._out[rec.key] = rec
        early = self._early_out.pop(rec.key, None)
        if early is not None and isinstance(early[0], wire.Ready):
            self._bind(rec, early[0])
        elif early is not None:
            self.fail_outbound(rec, f"receiver aborted: {early[0].reason}", tell=False)

    def register_in(self, rec: InboundTransfer) -> None:
        error = self._register_error(rec.key, self._in_by_key)
        if error is None:
            try:
                self.peers.retain(rec.peer, time.monotonic())
            except KVTransferError as exc:
                error = str(exc)
        if error is not None:
            rec.state.fail(error)
            rec.dropped = True
            return
        self._in[rec.nonce] = rec
        self._in_by_key[rec.key] = rec
        early = self._early_in.pop(rec.key, None)
        if early is not None:
            self.fail_inbound(rec, f"sender aborted: {early[0].reason}", tell=False)

    def _register_error(self, key: tuple[str, str], table: dict) -> str | None:
        if self.closed:
            return CLOSED
        if key in table:
            return f"a transfer of rid {key[1]!r} with {key[0]} is already in progress"
        return None

    def queue_chunk(self, rec: OutboundTransfer, chunk: Chunk) -> None:
        if rec.dropped or rec.state.is_final:
            return
        rec.chunks.append(chunk)
        rec.pages_queued += len(chunk.pages)
        if rec.nonce is not None and self._check_page_count(rec):
            rec.state.advance(KVPoll.Transferring)
            self._sending[rec] = None

    def init_receiver(self, rec: InboundTransfer, pages: list[int]) -> None:
        if rec.dropped or rec.state.is_final:
            return
        rec.pages = pages
        offer = self.plane.offer(rec)
        if rec.dropped or rec.state.is_final:
            return  # the plane failed it (or the worker aborted meanwhile: its command tells the peer)
        ready = wire.Ready(rec.rid, rec.nonce, len(pages), rec.region.layout.to_wire(), offer)
        self.peers.send(rec.peer, ready)

    def after_local_abort_out(self, rec: OutboundTransfer) -> None:
        if not rec.dropped:
            self.peers.send(
                rec.peer, wire.Abort(rec.rid, rec.nonce, rec.state.reason or "", False), create=False
            )
            self.drop_out(rec)

    def after_local_abort_in(self, rec: InboundTransfer) -> None:
        if not rec.dropped:
            self.peers.send(
                rec.peer, wire.Abort(rec.rid, rec.nonce, rec.state.reason or "", True), create=False
            )
            self.drop_in(rec)

    # ------------------------------------------------------------------ sending

    def _bind(self, rec: OutboundTransfer, ready: wire.Ready) -> None:
        rec.nonce = ready.nonce
        if rec.state.is_final:
            return  # aborted by the worker: its queued command tells the receiver, with this nonce
        self._out_by_nonce[rec.nonce] = rec
        rec.dest_num_pages = ready.num_pages
        rec.offer = ready.plane
        self.peers.send(rec.peer, wire.Bound(rec.nonce))
        mismatch = layout_mismatch(rec.region.layout.to_wire(), ready.layout)
        if mismatch is not None:
            self.fail_outbound(rec, mismatch)
            return
        if not self._check_page_count(rec):
            return
        rec.state.advance(KVPoll.Transferring if rec.chunks else KVPoll.WaitingForInput)
        self.plane.on_bound(rec)
        if rec.chunks and not rec.dropped:
            self._sending[rec] = None

    def _check_page_count(self, rec: OutboundTransfer) -> bool:
        assert rec.dest_num_pages is not None
        if rec.pages_queued <= rec.dest_num_pages:
            return True
        self.fail_outbound(rec, f"{rec.pages_queued} pages sent, the receiver allocated {rec.dest_num_pages}")
        return False

    def pump(self, budget_s: float = 0.005) -> bool:
        """Hands messages to the data plane, one per sending transfer per round (round robin),
        until none can go (staging full) or budget_s passed, so the loop still reads its socket
        in between. True when at least one message went."""
        progress = False
        deadline = time.monotonic() + budget_s
        while self._sending and time.monotonic() < deadline:
            moved = False
            for rec in list(self._sending):
                moved |= self._submit_next(rec)
            progress |= moved
            if not moved:
                break
        return progress

    def _submit_next(self, rec: OutboundTransfer) -> bool:
        if rec.dropped or rec.state.is_final:
            self._sending.pop(rec, None)
            return False
        chunk, layout = rec.chunks[0], rec.region.layout
        if chunk.specs is None:
            chunk.specs = plan_messages(
                chunk.first_page, len(chunk.pages), layout, self.plane.message_bytes(rec)
            )
            if not chunk.specs:  # is_last with no pages left: the header carries first_output
                chunk.specs = [MessageSpec(chunk.first_page, 0, 0, 0)]
        spec = chunk.specs[chunk.next_spec]
        last = chunk.is_last and chunk.next_spec == len(chunk.specs) - 1
        assert rec.nonce is not None
        msg = data_header(rec.rid, rec.nonce, spec, layout, last, rec.pages_queued, chunk.first_output)
        offset = spec.first_page - chunk.first_page
        src_pages = chunk.pages[offset : offset + spec.num_pages]
        if not self.plane.submit(rec, msg, spec, src_pages, chunk.ready_event):
            return False
        if rec.dropped:  # the plane failed it
            return True
        rec.last_submitted = rec.last_submitted or last
        chunk.next_spec += 1
        if chunk.next_spec == len(chunk.specs):
            rec.chunks.popleft()
            if not rec.chunks:
                self._sending.pop(rec, None)
        if last and self.plane.done_when_written(rec) and rec.state.advance(KVPoll.Success):
            self.drop_out(rec)  # the receiver's Ack, or a late Abort, then meets a finished nonce
        return True

    def fail_outbound(self, rec: OutboundTransfer, reason: str, tell: bool = True) -> None:
        if rec.state.fail(reason):
            if tell:
                self.peers.send(rec.peer, wire.Abort(rec.rid, rec.nonce, reason, False), create=False)
            self.drop_out(rec)

    def drop_out(self, rec: OutboundTransfer) -> None:
        if rec.dropped:
            return
        rec.dropped = True
        now = time.monotonic()
        if self._out.get(rec.key) is rec:
            del self._out[rec.key]
        if rec.nonce is not None:
            if self._out_by_nonce.get(rec.nonce) is rec:
                del self._out_by_nonce[rec.nonce]
            self._finished[rec.nonce] = now + FINISHED_TTL_S
        self._sending.pop(rec, None)
        rec.chunks.clear()
        self.peers.release(rec.peer, now)

    # ------------------------------------------------------------------ receiving

    def on_data(self, src: str, msg: wire.Data, payload: list) -> None:
        rec = self._in.get(msg.nonce)
        if rec is None or rec.peer != src or rec.state.is_final:
            self.plane.discard(src, msg, payload)
            if rec is None and msg.nonce not in self._finished:
                self._finished[msg.nonce] = time.monotonic() + FINISHED_TTL_S
                self.peers.send(
                    src, wire.Abort(msg.rid, msg.nonce, "the receiver has no such transfer", True)
                )
            return
        error = data_error(rec.region.layout, rec.pages, msg) or self.plane.payload_error(msg, payload)
        if error is not None:
            self.plane.discard(src, msg, payload)
            self.fail_inbound(rec, f"bad data message: {error}")
            return
        assert rec.pages is not None
        spec = MessageSpec(msg.first_page, msg.num_pages, msg.layer_begin, msg.layer_end)
        dst_pages = rec.pages[msg.first_page : msg.first_page + msg.num_pages]
        self.plane.receive(rec, msg, spec, dst_pages, payload, lambda: self._on_written(rec, msg))

    def _on_written(self, rec: InboundTransfer, msg: wire.Data) -> None:
        rec.cells_written += msg.num_pages * (msg.layer_end - msg.layer_begin)
        if rec.dropped or rec.state.is_final:
            return
        rec.state.advance(KVPoll.Transferring)
        if not msg.is_last:
            return
        assert rec.pages is not None
        expected = msg.total_pages * rec.region.layout.num_layers
        if msg.total_pages > len(rec.pages) or rec.cells_written != expected:
            self.fail_inbound(
                rec, f"incomplete KV: {rec.cells_written} page-layers written, the sender sent {expected}"
            )
            return
        rec.first_output = msg.first_output
        if rec.state.advance(KVPoll.Success):
            self.peers.send(rec.peer, wire.Ack(rec.nonce), create=False)
            self.drop_in(rec)

    def fail_inbound(self, rec: InboundTransfer, reason: str, tell: bool = True) -> None:
        if rec.state.fail(reason):
            if tell:
                self.peers.send(rec.peer, wire.Abort(rec.rid, rec.nonce, reason, True), create=False)
            self.drop_in(rec)

    def drop_in(self, rec: InboundTransfer) -> None:
        if rec.dropped:
            return
        rec.dropped = True
        now = time.monotonic()
        if self._in.get(rec.nonce) is rec:
            del self._in[rec.nonce]
        if self._in_by_key.get(rec.key) is rec:
            del self._in_by_key[rec.key]
        self._finished[rec.nonce] = now + FINISHED_TTL_S
        self.peers.release(rec.peer, now)

    # ------------------------------------------------------------------ other messages

    def on_ready(self, src: str, msg: wire.Ready, payload: list) -> None:
        rec = self._out.get((src, msg.rid))
        if rec is not None and rec.nonce is None:
            self._bind(rec, msg)
        elif rec is not None and rec.nonce != msg.nonce:
            reason = "the sender is already bound to another receiver for this rid"
            self.peers.send(src, wire.Abort(msg.rid, msg.nonce, reason, False))
        elif rec is None:
            self._early_out[(src, msg.rid)] = (msg, time.monotonic() + self.config.transfer_timeout_s)

    def on_bound(self, src: str, msg: wire.Bound, payload: list) -> None:
        rec = self._in.get(msg.nonce)
        if rec is not None and rec.peer == src:
            rec.state.advance(KVPoll.WaitingForInput)

    def on_ack(self, src: str, msg: wire.Ack, payload: list) -> None:
        rec = self._out_by_nonce.get(msg.nonce)
        if rec is None or rec.peer != src:
            return
        if not rec.last_submitted:
            self.fail_outbound(rec, "the receiver acknowledged before the last message was sent")
        elif rec.state.advance(KVPoll.Success):
            self.drop_out(rec)

    def on_abort(self, src: str, msg: wire.Abort, payload: list) -> None:
        expiry = time.monotonic() + self.config.transfer_timeout_s
        key = (src, msg.rid)
        if msg.to_sender:
            if msg.nonce in self._finished:
                return  # for a sender already done (a plane's own write finished it)
            rec = self._out_by_nonce.get(msg.nonce) if msg.nonce is not None else None
            if rec is None and key in self._out and self._out[key].nonce is None:
                rec = self._out[key]  # aborted before its Ready reached us
            if rec is not None and rec.peer == src:
                self.fail_outbound(rec, f"receiver aborted: {msg.reason}", tell=False)
            elif rec is None and key not in self._out:
                early = self._early_out.get(key)
                if early is None or getattr(early[0], "nonce", None) == msg.nonce:
                    self._early_out[key] = (msg, expiry)
            return
        inbound = self._in.get(msg.nonce) if msg.nonce is not None else self._in_by_key.get(key)
        if inbound is not None and inbound.peer == src:
            self.fail_inbound(inbound, f"sender aborted: {msg.reason}", tell=False)
        elif inbound is None and msg.nonce is None:
            self._early_in[key] = (msg, expiry)

    def fail_transfers_with(
        self, peer: str, reason: str, outbound: bool = True, inbound: bool = True
    ) -> None:
        """Fails every transfer with `peer` (one direction or both) without telling it."""
        for rec in [r for r in self._out.values() if r.peer == peer] if outbound else []:
            self.fail_outbound(rec, reason, tell=False)
        for inbound_rec in [r for r in self._in.values() if r.peer == peer] if inbound else []:
            self.fail_inbound(inbound_rec, reason, tell=False)

    def fail_all(self, reason: str, tell: bool) -> None:
        for rec in list(self._out.values()):
            self.fail_outbound(rec, reason, tell)
            self.drop_out(rec)
        for inbound in list(self._in.values()):
            self.fail_inbound(inbound, reason, tell)
            self.drop_in(inbound)
