"""Liveness across the hosts of a tensor-parallel worker (`--nnodes K`), through the TCP store that
rank 0 hosts at --dist-init-addr (the process group's rendezvous).

Keys (outside torch's own prefix in that store):
- `pdserve/tp/beat/<node>`: a counter that node's supervisor adds 1 to every BEAT_S (node 0: rank
  0's process, `NodeWatch`; node R > 0: its launcher, tp_node.py).
- `pdserve/tp/down`: `"<rank> <status>"`, set by a node launcher whose rank died or that stops.
- `pdserve/tp/closing`: set by rank 0 before a clean stop; launchers then stop their ranks and add 1
  to `pdserve/tp/closed`, which rank 0 waits for (up to CLOSE_WAIT_S) before its store goes away.

Rules:
- A peer is gone when its counter has not moved for STALE_S of the watcher's own clock (the hosts'
  clocks differ; a counter does not), or, for rank 0, when the store stops answering: rank 0's
  process hosts it, so its death closes the store's sockets at once, and a host that vanishes times
  a call out after STORE_TIMEOUT_S.
- `BeatWatch(strict=True)` counts a peer that never beat from the watch's start (rank 0 watches the
  launchers once every rank joined, when they beat already); a launcher's watch of rank 0 waits for
  its first beat, as rank 0 beats only after the ranks joined.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from pdserve.shared.args import EngineArgs, split_host_port

logger = logging.getLogger(__name__)

BEAT_S = 0.5
STALE_S = 5.0  # 10 missed beats: a loaded host delays a beat, not ten of them
STORE_TIMEOUT_S = 3.0
DOWN_KEY = "pdserve/tp/down"
CLOSING_KEY = "pdserve/tp/closing"
CLOSED_KEY = "pdserve/tp/closed"
CLOSE_WAIT_S = 3.0
STORE_ERRORS = (RuntimeError, OSError)  # torch's DistError is a RuntimeError


def beat_key(node: int) -> str:
    return f"pdserve/tp/beat/{node}"


def down_value(rank: int, status: int) -> str:
    return f"{rank} {status}"


def store_error(exc: BaseException) -> str:
    """The first line of a store error (torch appends its C++ stack)."""
    return str(exc).split("\n", 1)[0]


def parse_down(value: bytes) -> tuple[int, int]:
    """(rank, status) of a `down_value`."""
    rank, status = value.decode().split()
    return int(rank), int(status)


@dataclass
class BeatWatch:
    """One peer's beat counter, as this process's clock saw it move (see the module rules)."""

    started_at: float
    strict: bool = True
    stale_s: float = STALE_S
    value: int = 0
    changed_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.changed_at = self.started_at

    def observe(self, value: int, now: float) -> None:
        if value != self.value:
            self.value, self.changed_at = value, now

    def stale(self, now: float) -> bool:
        if self.value == 0 and not self.strict:
            return False
        return now - self.changed_at > self.stale_s


def connect_store(address: str, timeout_s: float) -> dist.TCPStore:
    """A client of the store at `address` (HOST:PORT), waiting up to timeout_s for it to listen;
    its calls then time out after STORE_TIMEOUT_S. Raises a STORE_ERRORS error."""
    host, port = split_host_port(address)
    store = dist.TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
    return store


class NodeWatch:
    """Rank 0's side: beats for node 0 and calls `on_rank_exit(rank, status)` once when another
    node reports a dead rank (its status) or stops beating (status -1, its first rank)."""

    def __init__(self, args: EngineArgs, on_rank_exit: Callable[[int, int], None]):
        assert args.dist_init_addr is not None
        self.store = connect_store(args.dist_init_addr, STORE_TIMEOUT_S)
        self.on_rank_exit = on_rank_exit
        now = time.monotonic()
        self.first_ranks = {node: node * args.tp_ranks_per_node for node in range(1, args.nnodes)}
        self.watches = {node: BeatWatch(now) for node in self.first_ranks}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tp-nodes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                gone = self._gone_rank()
            except STORE_ERRORS as exc:  # the store is this process's own: it fails as the process ends
                if self._stop.is_set():
                    return
                logger.error("the tensor-parallel store stopped answering: %s", store_error(exc))
                gone = (0, -1)
            if gone is not None and not self._stop.is_set():
                self.on_rank_exit(*gone)
                return

    def _gone_rank(self) -> tuple[int, int] | None:
        self.store.add(beat_key(0), 1)
        if self.store.check([DOWN_KEY]):
            rank, status = parse_down(self.store.get(DOWN_KEY))
            logger.error("tensor-parallel rank %d on another host exited with status %d", rank, status)
            return rank, status
        now = time.monotonic()
        for node, watch in self.watches.items():
            watch.observe(self.store.add(beat_key(node), 0), now)
            if watch.stale(now):
                logger.error(
                    "tensor-parallel node %d stopped beating %.0f s ago", node, now - watch.changed_at
                )
                return self.first_ranks[node], -1
        return None

    def close(self) -> None:
        """Stops watching, tells the launchers the worker closes and waits until they heard it (they
        stop their ranks), so they do not take the store's end for a crash."""
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + CLOSE_WAIT_S
        try:
            self.store.set(CLOSING_KEY, "1")
            while self.store.add(CLOSED_KEY, 0) < len(self.watches) and time.monotonic() < deadline:
                time.sleep(BEAT_S / 5)
        except STORE_ERRORS:
            pass
