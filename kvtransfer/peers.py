"""The peers of one KV manager: a DEALER to each peer's ROUTER, and whether the peer is alive.

Liveness, for peers this manager has transfers with (`active > 0`):
- a Ping goes out every heartbeat interval; every manager answers any Ping with a Pong, so a peer
  that has not even made its side of the transfer yet still proves it is alive;
- any message from the peer counts as hearing from it; silence longer than the heartbeat timeout
  (process stopped, host gone, network cut) makes the peer dead;
- the DEALER's socket monitor reports a dropped TCP connection at once (a killed process's kernel
  closes its sockets), so a crash on the same or a reachable host fails transfers in milliseconds.
The clock of a peer restarts when it becomes active, so a peer that was idle is not judged by its
old silence.

Owned by the I/O thread only (ZMQ sockets are not thread-safe). Peers without transfers keep their
DEALER a while (answers, next transfers) and are closed when idle for `idle_close_s`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.kvtransfer import wire
from pdserve.kvtransfer.base import KVTransferError

logger = logging.getLogger(__name__)

_TCP_ENDPOINT = re.compile(r"^tcp://[^\s:/]+:\d{1,5}$|^tcp://\[[0-9a-fA-F:.]+\]:\d{1,5}$")


def check_endpoint(endpoint: str) -> None:
    """Raises KVTransferError unless endpoint looks like tcp://host:port."""
    if not isinstance(endpoint, str) or not _TCP_ENDPOINT.match(endpoint):
        raise KVTransferError(f"not a KV endpoint (tcp://host:port): {endpoint!r}")


@dataclass(eq=False)
class Peer:
    endpoint: str
    last_heard: float
    last_activity: float
    last_ping: float = float("-inf")
    incarnation: str | None = None
    active: int = 0
    dealer: zmq.Socket | None = None
    monitor: zmq.Socket | None = None


class PeerTable:
    def __init__(self, ctx: zmq.Context, poller: zmq.Poller, src: str, inc: str):
        self._ctx = ctx
        self._poller = poller
        self.src = src
        self.inc = inc
        self._peers: dict[str, Peer] = {}
        self._by_monitor: dict[zmq.Socket, Peer] = {}

    def __contains__(self, endpoint: str) -> bool:
        return endpoint in self._peers

    def active_count(self) -> int:
        return sum(p.active for p in self._peers.values())

    def _get(self, endpoint: str, now: float) -> Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._peers[endpoint] = Peer(endpoint, last_heard=now, last_activity=now)
        return peer

    def _connect(self, peer: Peer) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # No send high-water mark: data is bounded by the data plane's staging buffers and control
        # messages are tiny; a dead peer's queue is dropped with its DEALER.
        dealer.setsockopt(zmq.SNDHWM, 0)
        try:
            dealer.connect(peer.endpoint)
        except zmq.ZMQError as exc:
            dealer.close(linger=0)
            raise KVTransferError(f"cannot connect to KV peer {peer.endpoint}: {exc}") from exc
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller.register(monitor, zmq.POLLIN)
        self._by_monitor[monitor] = peer
        peer.dealer, peer.monitor = dealer, monitor

    def retain(self, endpoint: str, now: float) -> None:
        """A transfer with `endpoint` starts: connect if needed; the liveness clock starts now."""
        peer = self._get(endpoint, now)
        if peer.dealer is None:
            self._connect(peer)
        if peer.active == 0:
            peer.last_heard = now
            peer.last_ping = float("-inf")
        peer.active += 1

    def release(self, endpoint: str, now: float) -> None:
        peer = self._peers.get(endpoint)
        if peer is not None and peer.active > 0:
            peer.active -= 1
            peer.last_activity = now

    def heard(self, endpoint: str, inc: str, now: float) -> bool:
        """Records a message from `endpoint`; True when it comes from a new incarnation (restart)."""
        peer = self._get(endpoint, now)
        peer.last_heard = peer.last_activity = now
        restarted = peer.incarnation is not None and peer.incarnation != inc
        peer.incarnation = inc
        return restarted

    def send(self, endpoint: str, msg: Any, payload: Any = None, create: bool = True) -> Any:
        """Queues msg (and a zero-copy payload) for `endpoint`. Returns the payload's MessageTracker
        (or None without payload); False when the peer is unknown and `create` is off."""
        peer = self._peers.get(endpoint)
        if peer is None:
            if not create:
                return False
            peer = self._get(endpoint, float("-inf"))
        if peer.dealer is None:
            self._connect(peer)
        assert peer.dealer is not None
        header = wire.encode(self.src, self.inc, msg)
        try:
            if payload is None:
                peer.dealer.send(header, zmq.NOBLOCK)
                return None
            return peer.dealer.send_multipart([header, payload], zmq.NOBLOCK, copy=False, track=True)
        except zmq.Again:
            # Cannot happen without a high-water mark; a dropped control message is covered by
            # heartbeats and timeouts anyway.
            logger.warning("KV peer %s: send queue full, %s dropped", endpoint, msg.TAG)
            return False

    def due_pings(self, now: float, interval_s: float) -> list[str]:
        due = []
        for peer in self._peers.values():
            if peer.active > 0 and now - peer.last_ping >= interval_s:
                peer.last_ping = now
                due.append(peer.endpoint)
        return due

    def silent(self, now: float, timeout_s: float) -> list[tuple[str, float]]:
        """Active peers not heard from for longer than timeout_s, with their silence in seconds."""
        return [
            (p.endpoint, now - p.last_heard)
            for p in self._peers.values()
            if p.active > 0 and now - p.last_heard > timeout_s
        ]

    def disconnected(self, ready: dict[Any, int]) -> list[str]:
        """Peers whose TCP connection dropped, from the poller's result `ready`."""
        lost = []
        for monitor, peer in list(self._by_monitor.items()):
            if monitor not in ready:
                continue
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_DISCONNECTED and peer.endpoint not in lost:
                    lost.append(peer.endpoint)
        return lost

    def drop(self, endpoint: str, linger_ms: int = 0) -> None:
        """Closes the DEALER (queued messages and their zero-copy buffers are released)."""
        peer = self._peers.pop(endpoint, None)
        if peer is not None:
            self._close(peer, linger_ms)

    def _close(self, peer: Peer, linger_ms: int) -> None:
        if peer.monitor is not None:
            self._poller.unregister(peer.monitor)
            del self._by_monitor[peer.monitor]
            assert peer.dealer is not None
            peer.dealer.disable_monitor()
            peer.monitor.close(linger=0)
        if peer.dealer is not None:
            peer.dealer.close(linger=linger_ms)
        peer.dealer = peer.monitor = None

    def close_idle(self, now: float, idle_s: float) -> list[str]:
        """Closes peers without transfers for idle_s; returns their endpoints."""
        idle = [e for e, p in self._peers.items() if p.active == 0 and now - p.last_activity > idle_s]
        for endpoint in idle:
            self.drop(endpoint)
        return idle

    def close_all(self, linger_ms: int) -> None:
        for peer in self._peers.values():
            self._close(peer, linger_ms)
        self._peers.clear()
