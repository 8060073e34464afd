"""The control plane of the zmq and nccl backends: one ROUTER socket, one I/O thread per manager.

A request's transfer on the wire (messages in wire.py; the data plane moves the bytes):

    receiver's manager                                   sender's manager
    make_receiver(rid, src): pings src                   make_sender(rid, dest): pings dest
    init(pages) ── Ready(rid, nonce, n, layout) ──────▶   binds the sender (or keeps the Ready
                                                         until make_sender comes): WaitingForInput
    WaitingForInput ◀──────── Bound(nonce) ───────────
                    ◀── Data(pages x layers) + bytes ──   send(): cut into messages, staged, sent
    Transferring    ◀── ... last Data(is_last, total pages, first_output)
    all cells written: Success ── Ack(nonce) ─────────▶   Success
    Either side failing (abort, timeout, bad data) sends Abort; a peer that dies, restarts away or
    falls silent (peers.py) fails every transfer with it, on both sides, within the heartbeat timeout.

Messages that come early are kept, not dropped: a Ready before make_sender, an Abort before the
handle it concerns exists; they expire after `transfer_timeout_s` (an unclaimed Ready is then
answered with an Abort). Data for a transfer the receiver no longer knows is consumed and answered
with one Abort. State for a transfer is dropped once it is final and the peer has been told.

Threads: the worker calls the handles (handles.py) from its own thread; they change a transfer's
state under its lock and pass work to the I/O thread through a command queue plus a wake-up pipe.
The I/O thread owns the sockets and every table. Whoever makes a transfer final (the I/O thread, or
the worker through abort()) is the one that tells the peer and drops the record.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import KVManager, KVPoll, KVReceiver, KVSender, KVTransferConfig, KVTransferError
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.handles import CLOSED, ChannelReceiver, ChannelSender
from pdserve.kvtransfer.layout import KVLayout, MessageSpec, dtype_name, plan_messages
from pdserve.kvtransfer.peers import PeerTable, check_endpoint
from pdserve.kvtransfer.records import Chunk, InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.state import TransferState
from pdserve.shared.engine.kv_pool import PagedKVPool

logger = logging.getLogger(__name__)


class ControlPlaneManager(KVManager):
    TICK_S = 0.05  # timers (pings, silence, deadlines) are checked this often
    MAX_READS_PER_TURN = 64  # inbound messages handled before the loop looks at its other work
    IDLE_PEER_CLOSE_S = 60.0
    CLOSE_LINGER_MS = 500  # at close, final Aborts get this long to leave
    FINISHED_TTL_S = 30.0  # a dropped transfer's nonce is remembered this long (no Abort storms)

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        config: KVTransferConfig | None,
        host: str,
        port: int,
        max_message_bytes: int,
        make_plane: Callable[[ControlPlaneManager], DataPlane],
    ):
        super().__init__(pool, worker_id, config)
        self.layout = KVLayout.of(pool)
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.Context(io_threads=1)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        try:
            self._router.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            self._ctx.term()
            raise KVTransferError(f"cannot bind a KV endpoint on {host}:{port}: {exc}") from exc
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self.peers = PeerTable(self._ctx, self._poller, self.endpoint, os.urandom(6).hex())

        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._command_lock = threading.Lock()  # makes "running?" and "queue it" one step
        self._running = True
        self._stop = False
        self._stopping = False
        self._out: dict[tuple[str, str], OutboundTransfer] = {}
        self._out_by_nonce: dict[bytes, OutboundTransfer] = {}
        self._in: dict[bytes, InboundTransfer] = {}
        self._in_by_key: dict[tuple[str, str], InboundTransfer] = {}
        self._early_out: dict[tuple[str, str], tuple[wire.Ready | wire.Abort, float]] = {}
        self._early_in: dict[tuple[str, str], tuple[wire.Abort, float]] = {}
        self._finished: dict[bytes, float] = {}
        self._sending: dict[OutboundTransfer, None] = {}  # bound, with messages still to submit

        self.plane = make_plane(self)
        self._handlers: dict[type, Callable[[str, Any, list], None]] = {
            wire.Ping: self._on_ping,
            wire.Pong: lambda src, msg, payload: None,  # hearing it is all that counts
            wire.Ready: self._on_ready,
            wire.Bound: self._on_bound,
            wire.Data: self._on_data,
            wire.Ack: self._on_ack,
            wire.Abort: self._on_abort,
            **self.plane.handlers(),
        }
        self._thread = threading.Thread(target=self._run, name=f"kv-{worker_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker-thread API

    def make_sender(self, rid: str, dest_endpoint: str) -> KVSender:
        check_endpoint(dest_endpoint)
        rec = OutboundTransfer(rid, dest_endpoint, TransferState(self.config.transfer_timeout_s))
        if not self.call_soon(lambda: self._register_out(rec)):
            raise KVTransferError(CLOSED)
        return ChannelSender(self, rec)

    def make_receiver(self, rid: str, src_endpoint: str) -> KVReceiver:
        check_endpoint(src_endpoint)
        rec = InboundTransfer(rid, src_endpoint, os.urandom(8), TransferState(self.config.transfer_timeout_s))
        if not self.call_soon(lambda: self._register_in(rec)):
            raise KVTransferError(CLOSED)
        return ChannelReceiver(self, rec)

    def close(self) -> None:
        self.call_soon(self._request_stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def stats(self) -> dict[str, int]:
        """What this manager holds, for leak checks: transfers, early messages, retained peers."""
        snapshot: dict[str, int] = {}
        taken = threading.Event()

        def take() -> None:
            snapshot.update(
                senders=len(self._out),
                receivers=len(self._in),
                early=len(self._early_out) + len(self._early_in),
                sending=len(self._sending),
                peer_refs=self.peers.active_count(),
            )
            taken.set()

        if self.call_soon(take):
            taken.wait(5.0)
        return snapshot or {"senders": 0, "receivers": 0, "early": 0, "sending": 0, "peer_refs": 0}

    def call_soon(self, fn: Callable[[], None]) -> bool:
        """Runs fn on the I/O thread; False when the manager is closed (fn will never run)."""
        with self._command_lock:
            if not self._running:
                return False
            self._commands.put(fn)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # pipe full: a wake-up is already pending
        return True

    def ready_event(self) -> Any:
        """For CUDA pools: an event on the caller's current stream, so copies wait for its kernels."""
        if self.pool.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.pool.device))
        return event

    # ------------------------------------------------------------------ commands (I/O thread)

    def _register_out(self, rec: OutboundTransfer) -> None:
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

    def _register_in(self, rec: InboundTransfer) -> None:
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
        if self._stopping:
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
        self.peers.send(rec.peer, wire.Ready(rec.rid, rec.nonce, len(pages), self.layout.to_wire()))

    def after_local_abort_out(self, rec: OutboundTransfer) -> None:
        if not rec.dropped:
            self.peers.send(
                rec.peer, wire.Abort(rec.rid, rec.nonce, rec.state.reason or "", False), create=False
            )
            self._drop_out(rec)

    def after_local_abort_in(self, rec: InboundTransfer) -> None:
        if not rec.dropped:
            self.peers.send(
                rec.peer, wire.Abort(rec.rid, rec.nonce, rec.state.reason or "", True), create=False
            )
            self._drop_in(rec)

    def _request_stop(self) -> None:
        self._stop = True

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        crash = None
        try:
            self._loop()
        except BaseException as exc:  # the thread must fail its transfers, not vanish
            logger.exception("KV transfer thread of %s crashed", self.worker_id)
            crash = f"KV transfer thread crashed: {exc!r}"
        with self._command_lock:
            self._running = False
        self._stopping = True
        self._run_commands()  # registrations now fail as closed; aborts still reach peers
        self._fail_all(crash or CLOSED, tell=crash is None)
        try:
            self.plane.close()
        finally:
            self.peers.close_all(0 if crash else self.CLOSE_LINGER_MS)
            self._router.close(linger=0)
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stop:
            if not self._commands.empty():
                timeout_ms = 0
            elif self._sending or self.plane.busy():
                timeout_ms = 1  # waiting for staging room, which frees without waking us
            else:
                timeout_ms = max(0, math.ceil((next_tick - time.monotonic()) * 1000))
            ready = dict(self._poller.poll(timeout_ms))
            now = time.monotonic()
            if self._wake_r in ready:
                self._drain_wake_pipe()
            if self._router in ready:
                self._read_router(now)
            self._run_commands()
            for endpoint in self.peers.disconnected(ready):
                self._peer_failed(endpoint, f"connection to KV peer {endpoint} lost")
            if self._sending:
                self._pump()
            if now >= next_tick:
                self._tick(now)
                next_tick = now + min(self.TICK_S, self.config.heartbeat_interval_s / 4)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _read_router(self, now: float) -> None:
        for _ in range(self.MAX_READS_PER_TURN):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                if len(frames) < 2:
                    raise wire.WireError("an empty message")
                src, inc, msg = wire.decode(frames[1].bytes)
                check_endpoint(src)
            except (wire.WireError, KVTransferError) as exc:
                logger.warning("KV manager %s: dropped a message: %s", self.endpoint, exc)
                continue
            if self.peers.heard(src, inc, now):
                # Its old transfers have failed through the dropped connection already, or will
                # through unknown-nonce aborts; failing here could hit transfers meant for the new one.
                logger.info("KV peer %s restarted", src)
            try:
                self._handlers[type(msg)](src, msg, frames[2:])
            except Exception:  # one bad message must not stop every transfer
                logger.exception("KV manager %s: handling %s from %s failed", self.endpoint, msg.TAG, src)

    def _tick(self, now: float) -> None:
        for endpoint in self.peers.due_pings(now, self.config.heartbeat_interval_s):
            self.peers.send(endpoint, wire.Ping())
        for endpoint, silence in self.peers.silent(now, self.config.heartbeat_timeout_s):
            self._peer_failed(
                endpoint,
                f"KV peer {endpoint} silent for {silence:.1f} s "
                f"(heartbeat_timeout_s={self.config.heartbeat_timeout_s:g})",
            )
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
        self.peers.close_idle(now, self.IDLE_PEER_CLOSE_S)

    # ------------------------------------------------------------------ sending (I/O thread)

    def _bind(self, rec: OutboundTransfer, ready: wire.Ready) -> None:
        rec.nonce = ready.nonce
        if rec.state.is_final:
            return  # aborted by the worker: its queued command tells the receiver, with this nonce
        self._out_by_nonce[rec.nonce] = rec
        rec.dest_num_pages = ready.num_pages
        self.peers.send(rec.peer, wire.Bound(rec.nonce))
        if ready.layout != self.layout.to_wire():
            self.fail_outbound(
                rec, f"KV layout mismatch: sender {self.layout.describe()}, receiver {ready.layout}"
            )
            return
        if not self._check_page_count(rec):
            return
        rec.state.advance(KVPoll.Transferring if rec.chunks else KVPoll.WaitingForInput)
        self.plane.on_bound(rec.peer)
        if rec.chunks:
            self._sending[rec] = None

    def _check_page_count(self, rec: OutboundTransfer) -> bool:
        assert rec.dest_num_pages is not None
        if rec.pages_queued <= rec.dest_num_pages:
            return True
        self.fail_outbound(rec, f"{rec.pages_queued} pages sent, the receiver allocated {rec.dest_num_pages}")
        return False

    def _pump(self) -> None:
        """Hands each sending transfer's next message to the data plane (one each, round robin)."""
        for rec in list(self._sending):
            if rec.dropped or rec.state.is_final:
                self._sending.pop(rec, None)
                continue
            chunk = rec.chunks[0]
            if chunk.specs is None:
                chunk.specs = plan_messages(
                    chunk.first_page, len(chunk.pages), self.layout, self.max_message_bytes
                )
                if not chunk.specs:  # is_last with no pages left: the header carries first_output
                    chunk.specs = [MessageSpec(chunk.first_page, 0, 0, 0)]
            spec = chunk.specs[chunk.next_spec]
            last = chunk.is_last and chunk.next_spec == len(chunk.specs) - 1
            assert rec.nonce is not None
            msg = wire.Data(
                rec.rid,
                rec.nonce,
                spec.first_page,
                spec.num_pages,
                spec.layer_begin,
                spec.layer_end,
                dtype_name(self.layout.dtype),
                spec.nbytes(self.layout),
                is_last=last,
                total_pages=rec.pages_queued if last else -1,
                first_output=chunk.first_output if last else None,
            )
            offset = spec.first_page - chunk.first_page
            src_pages = chunk.pages[offset : offset + spec.num_pages]
            if not self.plane.submit(rec, msg, spec, src_pages, chunk.ready_event):
                continue
            if rec.dropped:  # the plane failed it
                continue
            rec.last_submitted = rec.last_submitted or last
            chunk.next_spec += 1
            if chunk.next_spec == len(chunk.specs):
                rec.chunks.popleft()
                if not rec.chunks:
                    self._sending.pop(rec, None)

    def send_data_header(self, peer: str, msg: wire.Data) -> None:
        """For data planes whose bytes travel elsewhere (NCCL): the header, in submission order."""
        self.peers.send(peer, msg, create=False)

    def fail_outbound(self, rec: OutboundTransfer, reason: str, tell: bool = True) -> None:
        if rec.state.fail(reason):
            if tell:
                self.peers.send(rec.peer, wire.Abort(rec.rid, rec.nonce, reason, False), create=False)
            self._drop_out(rec)

    def _drop_out(self, rec: OutboundTransfer) -> None:
        if rec.dropped:
            return
        rec.dropped = True
        now = time.monotonic()
        if self._out.get(rec.key) is rec:
            del self._out[rec.key]
        if rec.nonce is not None:
            if self._out_by_nonce.get(rec.nonce) is rec:
                del self._out_by_nonce[rec.nonce]
            self._finished[rec.nonce] = now + self.FINISHED_TTL_S
        self._sending.pop(rec, None)
        rec.chunks.clear()
        self.peers.release(rec.peer, now)

    # ------------------------------------------------------------------ receiving (I/O thread)

    def _on_data(self, src: str, msg: wire.Data, payload: list) -> None:
        rec = self._in.get(msg.nonce)
        if rec is None or rec.peer != src or rec.state.is_final:
            self.plane.discard(src, msg, payload)
            if rec is None and msg.nonce not in self._finished:
                self._finished[msg.nonce] = time.monotonic() + self.FINISHED_TTL_S
                self.peers.send(
                    src, wire.Abort(msg.rid, msg.nonce, "the receiver has no such transfer", True)
                )
            return
        error = self._data_error(rec, msg) or self.plane.payload_error(msg, payload)
        if error is not None:
            self.plane.discard(src, msg, payload)
            self.fail_inbound(rec, f"bad data message: {error}")
            return
        assert rec.pages is not None
        spec = MessageSpec(msg.first_page, msg.num_pages, msg.layer_begin, msg.layer_end)
        dst_pages = rec.pages[msg.first_page : msg.first_page + msg.num_pages]
        self.plane.receive(rec, msg, spec, dst_pages, payload, lambda: self._on_written(rec, msg))

    def _data_error(self, rec: InboundTransfer, msg: wire.Data) -> str | None:
        if rec.pages is None:
            return "data before the receiver's init()"
        if msg.dtype != dtype_name(self.layout.dtype):
            return f"dtype {msg.dtype}, the pool holds {dtype_name(self.layout.dtype)}"
        if not 0 <= msg.layer_begin <= msg.layer_end <= self.layout.num_layers:
            return f"layers [{msg.layer_begin}, {msg.layer_end}) of {self.layout.num_layers}"
        if msg.first_page < 0 or msg.num_pages < 0 or msg.first_page + msg.num_pages > len(rec.pages):
            return f"pages [{msg.first_page}, +{msg.num_pages}) beyond the {len(rec.pages)} given to init()"
        expected = msg.num_pages * (msg.layer_end - msg.layer_begin) * self.layout.cell_bytes
        if msg.nbytes != expected:
            return f"{msg.nbytes} bytes announced, the layout needs {expected}"
        return None

    def _on_written(self, rec: InboundTransfer, msg: wire.Data) -> None:
        rec.cells_written += msg.num_pages * (msg.layer_end - msg.layer_begin)
        if rec.dropped or rec.state.is_final:
            return
        rec.state.advance(KVPoll.Transferring)
        if not msg.is_last:
            return
        assert rec.pages is not None
        expected = msg.total_pages * self.layout.num_layers
        if msg.total_pages > len(rec.pages) or rec.cells_written != expected:
            self.fail_inbound(
                rec, f"incomplete KV: {rec.cells_written} page-layers written, the sender sent {expected}"
            )
            return
        rec.first_output = msg.first_output
        if rec.state.advance(KVPoll.Success):
            self.peers.send(rec.peer, wire.Ack(rec.nonce), create=False)
            self._drop_in(rec)

    def fail_inbound(self, rec: InboundTransfer, reason: str, tell: bool = True) -> None:
        if rec.state.fail(reason):
            if tell:
                self.peers.send(rec.peer, wire.Abort(rec.rid, rec.nonce, reason, True), create=False)
            self._drop_in(rec)

    def _drop_in(self, rec: InboundTransfer) -> None:
        if rec.dropped:
            return
        rec.dropped = True
        now = time.monotonic()
        if self._in.get(rec.nonce) is rec:
            del self._in[rec.nonce]
        if self._in_by_key.get(rec.key) is rec:
            del self._in_by_key[rec.key]
        self._finished[rec.nonce] = now + self.FINISHED_TTL_S
        self.peers.release(rec.peer, now)

    # ------------------------------------------------------------------ other messages (I/O thread)

    def _on_ping(self, src: str, msg: wire.Ping, payload: list) -> None:
        self.peers.send(src, wire.Pong())

    def _on_ready(self, src: str, msg: wire.Ready, payload: list) -> None:
        rec = self._out.get((src, msg.rid))
        if rec is not None and rec.nonce is None:
            self._bind(rec, msg)
        elif rec is not None and rec.nonce != msg.nonce:
            reason = "the sender is already bound to another receiver for this rid"
            self.peers.send(src, wire.Abort(msg.rid, msg.nonce, reason, False))
        elif rec is None:
            self._early_out[(src, msg.rid)] = (msg, time.monotonic() + self.config.transfer_timeout_s)

    def _on_bound(self, src: str, msg: wire.Bound, payload: list) -> None:
        rec = self._in.get(msg.nonce)
        if rec is not None and rec.peer == src:
            rec.state.advance(KVPoll.WaitingForInput)

    def _on_ack(self, src: str, msg: wire.Ack, payload: list) -> None:
        rec = self._out_by_nonce.get(msg.nonce)
        if rec is None or rec.peer != src:
            return
        if not rec.last_submitted:
            self.fail_outbound(rec, "the receiver acknowledged before the last message was sent")
        elif rec.state.advance(KVPoll.Success):
            self._drop_out(rec)

    def _on_abort(self, src: str, msg: wire.Abort, payload: list) -> None:
        expiry = time.monotonic() + self.config.transfer_timeout_s
        key = (src, msg.rid)
        if msg.to_sender:
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

    # ------------------------------------------------------------------ failures (I/O thread)

    def fail_transfers_with(
        self, peer: str, reason: str, outbound: bool = True, inbound: bool = True
    ) -> None:
        """Fails every transfer with `peer` (one direction or both) without telling it."""
        for rec in [r for r in self._out.values() if r.peer == peer] if outbound else []:
            self.fail_outbound(rec, reason, tell=False)
        for inbound_rec in [r for r in self._in.values() if r.peer == peer] if inbound else []:
            self.fail_inbound(inbound_rec, reason, tell=False)

    def _peer_failed(self, peer: str, reason: str) -> None:
        self.fail_transfers_with(peer, reason)
        for table in (self._early_out, self._early_in):
            for key in [k for k in table if k[0] == peer]:
                del table[key]
        self.plane.on_peer_lost(peer)
        self.peers.drop(peer)  # releases queued messages and their zero-copy buffers

    def _fail_all(self, reason: str, tell: bool) -> None:
        for rec in list(self._out.values()):
            self.fail_outbound(rec, reason, tell)
            self._drop_out(rec)
        for inbound in list(self._in.values()):
            self.fail_inbound(inbound, reason, tell)
            self._drop_in(inbound)
