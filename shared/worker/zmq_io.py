"""Typed ZMQ sockets between routers (DEALER) and a worker (ROUTER): one msgpack message per frame.

Wire rules:
- a client sends single-frame messages from a DEALER socket; the worker's ROUTER socket sees each as
  `[identity, frame]` and answers with `[identity, frame]`, which the DEALER receives as one frame;
- a frame that does not decode (or arrives in a different envelope) is reported as an `Envelope`
  with `message=None` and `error` set: the receiver logs and drops it, it never raises;
- a reply to an identity that has gone away (its connection dropped: the client died, or missed
  the heartbeats its connection carries) is not sent: `send` returns False (ZMQ_ROUTER_MANDATORY),
  so the worker can drop what that client had running; a reply to a client whose queue is full is
  dropped (never blocks), so a vanished or stuck client cannot block or crash the worker.

The sockets are not thread-safe: each belongs to the thread that created it (ZMQ's own rule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq

from pdserve.shared.protocol import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)

# Messages still queued at close get this long to leave: final abort outputs at shutdown must arrive.
DEFAULT_LINGER_MS = 1000


@dataclass
class Envelope:
    """One received frame: who sent it, and the message or why it could not be decoded."""

    identity: bytes
    frame: bytes
    message: Message | None
    error: str | None = None


def tcp_address(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


class RouterSocket:
    """The worker's bound ROUTER socket; `address` is the resolved endpoint (port 0 binds a free port)."""

    def __init__(self, ctx: zmq.Context, address: str):
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, DEFAULT_LINGER_MS)
        # a router whose connection dropped (missed heartbeats) comes back with the same identity:
        # the new connection takes it over instead of being refused while the old one lingers
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone identity is an error, not a silent drop
        self._sock.bind(address)
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def poll(self, timeout_ms: int) -> bool:
        """Waits up to timeout_ms (0: not at all) for a frame; True when one is ready."""
        return bool(self._sock.poll(timeout_ms, zmq.POLLIN))

    def recv_nowait(self) -> Envelope | None:
        """The next frame if one is queued, else None. Never raises on a malformed frame."""
        try:
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        identity = parts[0]
        if len(parts) != 2:
            return Envelope(identity, b"", None, f"expected [identity, frame], got {len(parts)} parts")
        try:
            return Envelope(identity, parts[1], decode(parts[1]))
        except ProtocolError as exc:
            return Envelope(identity, parts[1], None, str(exc))

    def send(self, identity: bytes, msg: Message) -> bool:
        """Queues msg for the client `identity`; False when that client is gone (no connection with
        that identity). A client whose queue is full (it reads too slowly) misses msg."""
        try:
            self._sock.send_multipart([identity, encode(msg)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("client %s reads too slowly: a %s was dropped", identity.hex(), type(msg).__name__)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False
        return True

    def close(self, linger_ms: int = DEFAULT_LINGER_MS) -> None:
        self._sock.close(linger=linger_ms)


class DealerSocket:
    """A client's DEALER socket connected to one worker."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes | None = None):
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self._sock.setsockopt(zmq.IDENTITY, identity)
        self._sock.connect(address)
        self.address = address

    def send(self, msg: Message) -> None:
        self._sock.send(encode(msg), copy=False)

    def send_raw(self, frame: bytes) -> None:
        """Sends bytes as they are: for tests of the worker's handling of malformed frames."""
        self._sock.send(frame)

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None when nothing arrives within timeout_ms (None: wait forever).

        Raises ProtocolError on a frame that does not decode: a worker only sends valid messages,
        so that is a bug worth surfacing in the client."""
        if timeout_ms is not None and not self._sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return decode(self._sock.recv())

    def close(self) -> None:
        self._sock.close(linger=0)
