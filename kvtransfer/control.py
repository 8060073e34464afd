"""The control plane of the zmq, nccl, cuda_ipc and auto backends: one ROUTER socket, one I/O thread each.

A request's transfer on the wire (messages in wire.py; the data plane moves the bytes):

    receiver's manager                                   sender's manager
    make_receiver(rid, src): pings src                   make_sender(rid, dest): pings dest
    init(pages) ── Ready(rid, nonce, n, layout) ──────▶   binds the sender (or keeps the Ready
                                                         until make_sender comes): WaitingForInput
    WaitingForInput ◀──────── Bound(nonce) ───────────
                    ◀── Data(pages x layers) + bytes ──   send(): cut into messages, staged, sent
    Transferring    ◀── ... last Data(is_last, total pages, first_output)
    all cells written: Success ── Ack(nonce) ─────────▶   Success
    Either side failing (abort, timeout, bad data) sends Abort; a peer whose connection drops or
    that falls silent (peers.py) fails every transfer with it, on both sides, within the heartbeat
    timeout.

Messages that come early are kept, not dropped: a Ready before make_sender, an Abort before the
handle it concerns exists; they expire after `transfer_timeout_s` (an unclaimed Ready is then
answered with an Abort). Data for a transfer the receiver no longer knows is consumed and answered
with one Abort. State for a transfer is dropped once it is final and the peer has been told. Those
rules live in transfers.py; this file is the loop, the sockets and the timers.

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
from pdserve.kvtransfer.base import (
    HeadRange,
    KVManager,
    KVReceiver,
    KVSender,
    KVTransferConfig,
    KVTransferError,
)
from pdserve.kvtransfer.data_plane import DataPlane
from pdserve.kvtransfer.handles import CLOSED, ChannelReceiver, ChannelSender
from pdserve.kvtransfer.head_slice import KVRegion
from pdserve.kvtransfer.peers import PeerTable, check_endpoint
from pdserve.kvtransfer.plane_host import PlaneHost
from pdserve.kvtransfer.records import Chunk, InboundTransfer, OutboundTransfer
from pdserve.kvtransfer.state import TransferState
from pdserve.kvtransfer.transfers import Transfers
from pdserve.shared.engine.kv_pool import PagedKVPool

logger = logging.getLogger(__name__)


class ControlPlaneManager(KVManager):
    TICK_S = 0.05  # timers (pings, silence, deadlines) are checked this often
    MAX_READS_PER_TURN = 64  # inbound messages handled before the loop looks at its other work
    IDLE_PEER_CLOSE_S = 60.0
    CLOSE_LINGER_MS = 500  # at close, final Aborts get this long to leave

    def __init__(
        self,
        pool: PagedKVPool,
        worker_id: str,
        config: KVTransferConfig | None,
        host: str,
        port: int,
        max_message_bytes: int,
        make_plane: Callable[[PlaneHost], DataPlane],
    ):
        super().__init__(pool, worker_id, config)
        self.whole = KVRegion.of(pool)
        self.layout = self.whole.layout
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
        self.stopping = False  # set when the loop ends: registrations now fail as closed
        self.transfers = Transfers(self.peers, self.config)
        self.plane = make_plane(self)
        self.transfers.plane = self.plane
        self.moves_head_slices = self.plane.moves_head_slices
        self._handlers: dict[type, Callable[[str, Any, list], None]] = {
            wire.Ping: self._on_ping,
            wire.Pong: lambda src, msg, payload: None,  # hearing it is all that counts
            **self.transfers.handlers(),
            **self.plane.handlers(),
        }
        self._thread = threading.Thread(target=self._run, name=f"kv-{worker_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ worker-thread API

    def make_sender(self, rid: str, dest_endpoint: str, heads: HeadRange | None = None) -> KVSender:
        check_endpoint(dest_endpoint)
        state = TransferState(self.config.transfer_timeout_s)
        rec = OutboundTransfer(rid, dest_endpoint, state, self._region(heads))
        if not self.call_soon(lambda: self.transfers.register_out(rec)):
            raise KVTransferError(CLOSED)
        return ChannelSender(self, rec)

    def make_receiver(self, rid: str, src_endpoint: str, heads: HeadRange | None = None) -> KVReceiver:
        check_endpoint(src_endpoint)
        state = TransferState(self.config.transfer_timeout_s)
        rec = InboundTransfer(rid, src_endpoint, os.urandom(8), state, self._region(heads))
        if not self.call_soon(lambda: self.transfers.register_in(rec)):
            raise KVTransferError(CLOSED)
        return ChannelReceiver(self, rec)

    def _region(self, heads: HeadRange | None) -> KVRegion:
        if heads is None:
            return self.whole
        if not self.plane.moves_head_slices:
            raise KVTransferError(f"the {type(self).__name__}'s copies need whole pools, not KV head slices")
        return KVRegion.of(self.pool, heads)

    def close(self) -> None:
        self.call_soon(self._request_stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def stats(self) -> dict[str, int]:
        """What this manager holds, for leak checks: transfers, early messages, retained peers, and
        what its data plane holds (cuda_ipc: mapped peer pools, open write-gate slots)."""
        snapshot: dict[str, int] = {}
        taken = threading.Event()

        def take() -> None:
            snapshot.update(self.transfers.stats())
            snapshot.update(self.plane.stats())
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

    # the handles' side (HandleHost), from the worker's thread

    def queue_chunk(self, rec: OutboundTransfer, chunk: Chunk) -> bool:
        return self.call_soon(lambda: self.transfers.queue_chunk(rec, chunk))

    def init_receiver(self, rec: InboundTransfer, pages: list[int]) -> bool:
        return self.call_soon(lambda: self.transfers.init_receiver(rec, pages))

    def aborted_out(self, rec: OutboundTransfer) -> None:
        self.call_soon(lambda: self.transfers.after_local_abort_out(rec))

    def aborted_in(self, rec: InboundTransfer) -> None:
        self.call_soon(lambda: self.transfers.after_local_abort_in(rec))

    def ready_event(self) -> Any:
        """For CUDA pools: an event on the caller's current stream, so copies wait for its kernels."""
        if self.pool.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.pool.device))
        return event

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
        self.stopping = True
        self.transfers.closed = True
        self._run_commands()  # registrations now fail as closed; aborts still reach peers
        self.transfers.fail_all(crash or CLOSED, tell=crash is None)
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
        pumped = False
        while not self._stop:
            if not self._commands.empty() or (pumped and self.transfers.sending):
                timeout_ms = 0
            elif self.transfers.sending:
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
            pumped = self.transfers.sending and self.transfers.pump()
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
        self.transfers.expire(now)
        for endpoint in self.peers.close_idle(now, self.IDLE_PEER_CLOSE_S):
            self.plane.on_peer_idle(endpoint)

    # ------------------------------------------------------------------ for the data planes (PlaneHost)

    def send(self, peer: str, msg: Any, payload: Any = None) -> Any:
        return self.peers.send(peer, msg, payload, create=False)

    def fail_outbound(self, rec: OutboundTransfer, reason: str, tell: bool = True) -> None:
        self.transfers.fail_outbound(rec, reason, tell)

    def fail_inbound(self, rec: InboundTransfer, reason: str, tell: bool = True) -> None:
        self.transfers.fail_inbound(rec, reason, tell)

    def fail_transfers_with(
        self, peer: str, reason: str, outbound: bool = True, inbound: bool = True
    ) -> None:
        self.transfers.fail_transfers_with(peer, reason, outbound, inbound)

    # ------------------------------------------------------------------ peers (I/O thread)

    def _on_ping(self, src: str, msg: wire.Ping, payload: list) -> None:
        self.peers.send(src, wire.Pong())

    def _peer_failed(self, peer: str, reason: str) -> None:
        self.transfers.forget_peer(peer, reason)
        self.plane.on_peer_lost(peer)
        self.peers.drop(peer)  # releases queued messages and their zero-copy buffers
