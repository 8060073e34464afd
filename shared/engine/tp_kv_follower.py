"""A follower rank's part of its worker's KV transfers (prefill and decode roles).

Rank 0 (tp_kv_transfer.py) sends the control messages of tp_kv_messages.py on the step channel;
the follower's loop (tp_follower.py) hands them here between passes and calls `pump()` after each
message and whenever no message came for `poll_s()` (short while a transfer is live): every leg's
state change since the last pump goes to rank 0 on the follower's own PUSH socket, never waiting.

Reports, msgpack lists: `["open", rank, RankEndpoint as a dict or None, error]` once, after
`OpenKV`; `["legs", rank, [[tid, leg index, KVPoll, reason], ...]]`. A follower's managers close
on `CloseKV` and when its loop ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import msgpack
import zmq

from pdserve.kvtransfer.base import KVTransferConfig
from pdserve.kvtransfer.rank_kv import RankKV
from pdserve.kvtransfer.tp_legs import Leg
from pdserve.shared.engine.kv_pool import PagedKVPool
from pdserve.shared.engine.tp_kv_messages import AbortKV, CloseKV, InitKV, OpenKV, SendKV, StartKV
from pdserve.shared.models.tensor_parallel import kv_head_start
from pdserve.shared.models.tensor_parallel_layers import TPRank

logger = logging.getLogger(__name__)

BUSY_POLL_S = 0.005  # while a transfer is live: how soon its state changes reach rank 0


def follower_heads(pool: PagedKVPool, rank: TPRank, num_kv_heads: int) -> list[int]:
    """The global KV heads of a follower rank's pool, in order (the sharding pass's choice)."""
    start = kv_head_start(rank, num_kv_heads)
    return list(range(start, start + pool.shape.num_kv_heads))


class FollowerKV:
    """`heads`: the global KV heads this rank's pool holds, in order; `local_options`: backend
    options that cannot travel in OpenKV (the fake backend's in-process hub)."""

    def __init__(
        self, pool: PagedKVPool, rank: int, heads: list[int], local_options: dict[str, Any] | None = None
    ):
        self.pool = pool
        self.rank = rank
        self.heads = heads
        self.local_options = local_options or {}
        self.kv: RankKV | None = None
        self._ctx: zmq.Context | None = None
        self._reports: zmq.Socket | None = None

    def handlers(self) -> dict[type, Callable[[Any], None]]:
        return {
            OpenKV: self.open,
            StartKV: self.start,
            SendKV: lambda m: self._kv().send(m.tid, m.pages, m.is_last, m.first_output),
            InitKV: lambda m: self._kv().init(m.tid, m.pages),
            AbortKV: lambda m: self._kv().abort(m.tid, m.reason),
            CloseKV: lambda _m: self.close(),
        }

    def _kv(self) -> RankKV:
        assert self.kv is not None, "a KV control message before OpenKV"
        return self.kv

    def open(self, msg: OpenKV) -> None:
        self._ctx = zmq.Context()
        self._reports = self._ctx.socket(zmq.PUSH)
        self._reports.setsockopt(zmq.LINGER, 1000)
        self._reports.connect(msg.report_address)
        config = KVTransferConfig(msg.heartbeat_interval_s, msg.heartbeat_timeout_s, msg.transfer_timeout_s)
        worker_id = f"{msg.worker_id}/tp{self.rank}"
        try:
            options = {**msg.options, **self.local_options}
            self.kv = RankKV.open(msg.backend, self.pool, worker_id, self.heads, msg.host, config, **options)
        except Exception as exc:  # rank 0 fails the worker's start with it
            logger.exception("tensor-parallel rank %d cannot open its KV managers", self.rank)
            self._report(["open", self.rank, None, f"{type(exc).__name__}: {exc}"])
            return
        self._report(["open", self.rank, asdict(self.kv.endpoint()), ""])

    def start(self, msg: StartKV) -> None:
        mine = [(index, Leg(rank, head, peer)) for index, rank, head, peer in msg.legs if rank == self.rank]
        self._kv().start(msg.tid, msg.rid, msg.sends, mine)

    def pump(self) -> None:
        if self.kv is None:
            return
        changes = self.kv.changes()
        if changes:
            self._report(["legs", self.rank, [list(c) for c in changes]])

    def poll_s(self, idle_s: float) -> float:
        return BUSY_POLL_S if self.kv is not None and self.kv.busy() else idle_s

    def _report(self, message: list[Any]) -> None:
        assert self._reports is not None
        self._reports.send(msgpack.packb(message))

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()
            self.pump()  # the failures the close caused reach rank 0 if it still listens
            self.kv = None
        if self._reports is not None:
            self._reports.close()
            self._reports = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
