"""The router's connection to one worker: an asyncio DEALER socket, a reader task, a monitor task.

    conn = WorkerConnection(ctx, "tcp://127.0.0.1:30001", name="w1")
    conn.start()
    queue = asyncio.Queue(); conn.subscribe("rid-1", queue); conn.send_nowait(GenerateRequest(...))
    out = await queue.get()          # RequestOutput, or a StreamFailure when the worker is lost
    info = await conn.query(ServerInfoQuery(), ServerInfo, timeout_s=5)

Rules:
- one event loop owns the connection; nothing here is thread-safe;
- `send_nowait` never waits: it raises WorkerUnavailable when no connection to the worker is up
  (ZMQ_IMMEDIATE: messages are not queued for a peer that is not there) or the send queue is full;
- the reader routes each RequestOutput of an OutputBatch, and each PrefillDone, to the queue
  subscribed for its rid (those of unknown rids are dropped: an abandoned request) and each
  reply to the `query` that waits for its (type, query_id);
- outputs reach their queues in slices of DELIVER_SLICE streams per event-loop turn, first
  outputs first (router/cluster/output_delivery.py says why); each stream's outputs stay in order; a
  stream handed its first output runs before the reader takes in the next frame;
- frames are read by a callback on the socket's file descriptor, not by a task awaiting pyzmq's
  futures: an output reaches its stream one event-loop turn after the descriptor turns readable
  (a task would add a turn, and pyzmq's future machinery some 20 us, per frame). ZMQ's descriptor
  signals edges, so every read takes all frames waiting, and every send (which may consume the
  edge of frames that arrived meanwhile) checks whether frames wait;
- liveness is the connection's, apart from the worker's progress: ZMTP heartbeats (`Heartbeat`)
  are sent and answered by libzmq's I/O threads, on both sides, so a worker whose loop is busy in
  a long step (a long prefill, a weights update, a graph capture) still answers them, while a
  frozen process (SIGSTOP), a vanished host or a cut network misses them and the connection is
  closed after `Heartbeat.timeout_s`. A killed process's kernel closes the TCP connection at once;
- when the connection drops (either way), every subscribed queue gets a StreamFailure at once and
  `connected` turns False; ZMQ reconnects by itself when the worker is back at the same address
  (or thaws), and `connected` turns True again once the handshake completes;
- the rids whose streams a dropped connection failed get an AbortRequest once the connection is
  back (a frozen worker that thaws would otherwise run requests that moved on, for nobody);
- `last_seen` is the monotonic time of the last frame received (progress, for /get_load);
- `close()` fails every subscribed queue and waiting query, then closes the sockets; outputs
  received before a failure reach their queues before the StreamFailure does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from pdserve.router.cluster.output_delivery import DELIVER_SLICE, PendingOutputs, StreamQueue
from pdserve.shared.protocol import (
    AbortRequest,
    Message,
    OutputBatch,
    PrefillDone,
    ProtocolError,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

# Requests can outnumber ZMQ's default high-water mark of 1000 queued messages in a burst.
SEND_HWM = 100_000
# plain ints: pyzmq's enum flags make each `&` a slow Python-level enum operation
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)

R = TypeVar("R", bound=Message)


@dataclass(frozen=True)
class Heartbeat:
    """ZMTP heartbeats of a connection: a PING every `interval_s`; no traffic for `timeout_s` closes it.

    The worker is told the same timeout (ZMTP's TTL), so it drops a frozen router's connection too."""

    interval_s: float = 0.5
    timeout_s: float = 3.0

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, round(self.interval_s * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, round(self.timeout_s * 1000)))
        # the TTL travels in deciseconds (at most 6553.5 s)
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(655_300, max(100, round(self.timeout_s * 1000))))


class WorkerUnavailable(Exception):
    """The worker cannot take a message now (not connected, or its send queue is full)."""


@dataclass(frozen=True)
class StreamFailure:
    """Put into a subscribed queue when the worker is lost; `reason` is for logs and error messages."""

    reason: str


class WorkerConnection:
    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, name: str = "", heartbeat: Heartbeat | None = None
    ):
        self.address = address
        self.name = name or address
        self.heartbeat = heartbeat or Heartbeat()
        self._sock = zmq.Socket(ctx, zmq.DEALER)  # a plain socket: read from the loop's fd callback
        self.heartbeat.apply(self._sock)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.RCVHWM, SEND_HWM)
        # a fresh identity per connection: a worker never mixes up two routers or two lives of one
        self._sock.setsockopt(zmq.IDENTITY, b"router-" + os.urandom(8).hex().encode())
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )
        self._sock.connect(address)
        self._streams: dict[str, StreamQueue] = {}
        self._fresh: set[str] = set()  # subscribed rids with no output received yet
        self._pending = PendingOutputs()  # received outputs not yet in their queues
        self._replies: dict[tuple[type[Message], int], asyncio.Future] = {}
        self._orphans: set[str] = set()  # rids failed by a dropped connection: aborted when it is back
        self._query_ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = self._sock.getsockopt(zmq.FD)
        self._turn: asyncio.Handle | None = None  # the next delivery turn, when one is scheduled
        self.connected = False
        self.closed = False
        self.last_seen = time.monotonic()
        self.times_disconnected = 0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)
        self._tasks = [asyncio.create_task(self._monitor_loop(), name=f"worker-monitor-{self.name}")]
        self._schedule_turn()  # frames may be waiting already (the descriptor's edge came before)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connected = False
        self.fail_streams(f"the connection to worker {self.name} was closed")
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    # ------------------------------------------------------------------ streams

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def subscribe(self, rid: str, queue: StreamQueue) -> None:
        self._streams[rid] = queue
        self._fresh.add(rid)

    def unsubscribe(self, rid: str) -> None:
        self._streams.pop(rid, None)
        self._fresh.discard(rid)

    def fail_streams(self, reason: str) -> int:
        """Ends every subscribed stream with StreamFailure(reason); returns how many there were."""
        self._pending.hand_out(None, self._streams)  # what arrived before the failure goes first
        streams, self._streams = self._streams, {}
        self._fresh.clear()
        for queue in streams.values():
            queue.put_nowait(StreamFailure(reason))
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(WorkerUnavailable(reason))
        self._replies.clear()
        return len(streams)

    # ------------------------------------------------------------------ sending

    def send_nowait(self, msg: Message) -> None:
        if self.closed or not self.connected:
            raise WorkerUnavailable(f"worker {self.name} is not connected")
        try:
            self._sock.send(encode(msg), _NOBLOCK)
        except zmq.Again:
            raise WorkerUnavailable(f"worker {self.name} cannot take messages now (not connected)") from None
        except zmq.ZMQError as exc:
            raise WorkerUnavailable(f"sending to worker {self.name} failed: {exc}") from None
        finally:
            with contextlib.suppress(zmq.ZMQError):
                self._check_readable()

    def send_abort(self, rid: str, message: str) -> None:
        """Best effort: a worker that is gone has nothing to abort."""
        with contextlib.suppress(WorkerUnavailable):
            self.send_nowait(AbortRequest(rid=rid, message=message))

    async def query(self, msg: Any, reply_type: type[R], timeout_s: float) -> R:
        """Sends a message with a `query_id` field and waits for the reply of that type and id.

        Raises WorkerUnavailable when it cannot be sent or the worker is lost, TimeoutError when no
        reply arrives within timeout_s."""
        msg.query_id = next(self._query_ids)
        key = (reply_type, msg.query_id)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._replies[key] = fut
        try:
            self.send_nowait(msg)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._replies.pop(key, None)

    # ------------------------------------------------------------------ background tasks

    def _on_readable(self) -> None:
        """The descriptor turned readable: take the frames in; hand out a slice unless a turn is due."""
        self._receive_ready()
        if self._turn is None:
            self._deliver()

    def _on_turn(self) -> None:
        self._turn = None
        self._receive_ready()  # frames that came during the last slice (first tokens among them)
        self._deliver()

    def _deliver(self) -> None:
        firsts = self._pending.hand_out(DELIVER_SLICE, self._streams)
        if self._pending or firsts:
            self._schedule_turn()  # the streams just woken (and any new I/O) run first

    def _schedule_turn(self) -> None:
        if self._turn is None and not self.closed and self._loop is not None:
            self._turn = self._loop.call_soon(self._on_turn)

    def _check_readable(self) -> None:
        """After a send: frames whose readable edge the send consumed get a turn."""
        if self._turn is None and not self.closed and self._sock.getsockopt(_EVENTS) & _POLLIN:
            self._schedule_turn()

    def _receive_ready(self) -> None:
        """Takes in every frame already here, without waiting (until EAGAIN: the descriptor's edge
        comes again only after that)."""
        sock = self._sock
        while not self.closed:
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                logger.warning("worker %s: receive failed: %s", self.name, exc)
                return
            self.last_seen = time.monotonic()
            self._on_frame(frame)

    def _on_frame(self, frame: bytes) -> None:
        """Routes one received frame: outputs to their streams, replies to their queries."""
        try:
            msg = decode(frame)
        except ProtocolError as exc:
            logger.warning("worker %s sent an undecodable frame: %s", self.name, exc)
            return
        if isinstance(msg, OutputBatch):
            streams, fresh = self._streams, self._fresh
            for out in msg.outputs:
                queue = streams.get(out.rid)
                if queue is not None:
                    self._pending.add(queue, out, first=out.rid in fresh)
            if fresh:
                fresh.difference_update([out.rid for out in msg.outputs])
            return
        if isinstance(msg, PrefillDone):  # a prefill worker's one answer: to the rid's stream too
            queue = self._streams.get(msg.rid)
            if queue is not None:
                queue.put_nowait(msg)
            return
        fut = self._replies.pop((type(msg), getattr(msg, "query_id", 0)), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _monitor_loop(self) -> None:
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except zmq.ZMQError:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                self.last_seen = time.monotonic()
                logger.info("connected to worker %s at %s", self.name, self.address)
                orphans, self._orphans = self._orphans, set()
                for rid in orphans:
                    self.send_abort(
                        rid, "The router lost its connection to this worker; the request moved on."
                    )
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and self.connected:
                self.connected = False
                self.times_disconnected += 1
                self._orphans.update(self._streams)
                lost = self.fail_streams(
                    f"lost the connection to worker {self.name} (it exited, or answered no heartbeat "
                    f"for {self.heartbeat.timeout_s:g} s)"
                )
                logger.warning("worker %s disconnected (%d request(s) in flight)", self.name, lost)
            elif kind == zmq.EVENT_MONITOR_STOPPED:
                return
