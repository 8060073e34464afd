"""The KV manager of a prefill or decode worker's rank 0: its own rank's managers and, with `--tp N`,
the followers' (tp_kv_follower.py), behind the one KVManager interface the engines use.

Every rank keeps its own managers over its own pool (the same page ids, its own KV heads:
kvtransfer/rank_kv.py); `endpoint` names them all (kvtransfer/tp_legs.py: `tp-kv:` and JSON, or
the plain endpoint of a single rank that moves whole pools only), and the router passes it through.

A request's handle (`make_sender` / `make_receiver`) plans its legs with the peer's endpoint:
rank i to rank i for equal widths, head slices otherwise. Rank 0 runs its own legs; the others
go to the followers as control messages on the step channel, in order with the forward passes
(so a follower has run the pass that wrote the pages before it sends them), and the followers
report their legs' states on a PULL socket of rank 0's that `poll()` drains without waiting.

- `poll()` is the minimum over every leg of every rank; Failed if any leg failed, with that leg's
  reason (and its rank's number); a failure aborts the other legs at once.
- A receiver's `first_output` is rank 0's first leg's.
- Threads: the engine's thread makes, sends, polls and aborts; `close()` comes from the worker's
  main thread. One lock covers every call, as ZMQ sockets are not thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from pdserve.kvtransfer.base import (
    HeadRange,
    KVManager,
    KVPoll,
    KVReceiver,
    KVSender,
    KVTransferConfig,
    KVTransferError,
)
from pdserve.kvtransfer.rank_kv import RankKV
from pdserve.kvtransfer.tp_legs import RankEndpoint, WorkerKVEndpoint, plan_legs
from pdserve.shared.engine.kv_pool import PagedKVPool
from pdserve.shared.engine.tp_kv_messages import AbortKV, CloseKV, InitKV, OpenKV, SendKV, StartKV

OPEN_TIMEOUT_S = 120.0
_FINAL = (KVPoll.Failed, KVPoll.Success)


class TPKVManager(KVManager):
    def __init__(
        self, backend: str, local: RankKV, pool: PagedKVPool, worker_id: str, config: KVTransferConfig | None
    ):
        super().__init__(pool, worker_id, config)
        self.backend = backend
        self.local = local
        self._ranks: list[RankEndpoint] = [local.endpoint()]
        self._control: Callable[[Any], None] | None = None
        self._ctx: zmq.Context | None = None
        self._reports: zmq.Socket | None = None
        self._remote: dict[int, dict[int, tuple[int, int, str]]] = {}  # tid -> leg -> (rank, state, why)
        self._next_tid = 0
        self._lock = threading.RLock()
        self._closed = False
        self.endpoint = self._endpoint()

    def _endpoint(self) -> str:
        own = WorkerKVEndpoint(self.backend, self._ranks)
        if own.width == 1 and not own.moves_heads:
            return self._ranks[0].full  # what a worker without this layer advertises
        return own.encode()

    def open_followers(
        self, send_control: Callable[[Any], None], num_followers: int, host: str, options: dict[str, Any]
    ) -> None:
        """Opens the followers' managers (tp_kv_follower.py); KVTransferError if one cannot."""
        self._ctx = zmq.Context()
        self._reports = self._ctx.socket(zmq.PULL)
        self._reports.setsockopt(zmq.LINGER, 0)
        self._reports.bind(f"tcp://{host}:0")
        self._control = send_control
        address = self._reports.getsockopt_string(zmq.LAST_ENDPOINT)
        c = self.config
        send_control(
            OpenKV(self.backend, self.worker_id, host, address, options, c.heartbeat_interval_s,
                   c.heartbeat_timeout_s, c.transfer_timeout_s)
        )  # fmt: skip
        followers: dict[int, RankEndpoint] = {}
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while len(followers) < num_followers:
            if not self._reports.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise KVTransferError(
                    f"tensor-parallel ranks opened {len(followers)} of {num_followers} KV managers"
                )
            kind, rank, endpoint, error = msgpack.unpackb(self._reports.recv())
            if kind != "open":
                continue
            if endpoint is None:
                raise KVTransferError(f"tensor-parallel rank {rank}: {error}")
            followers[rank] = RankEndpoint(**endpoint)
        self._ranks = [self._ranks[0], *(followers[r] for r in sorted(followers))]
        self.endpoint = self._endpoint()

    @property
    def rank_endpoints(self) -> list[RankEndpoint]:
        return list(self._ranks)

    def make_sender(self, rid: str, dest_endpoint: str, heads: HeadRange | None = None) -> KVSender:
        return TPSender(self, self._start(rid, dest_endpoint, True, heads), rid)

    def make_receiver(self, rid: str, src_endpoint: str, heads: HeadRange | None = None) -> KVReceiver:
        return TPReceiver(self, self._start(rid, src_endpoint, False, heads), rid)

    def _start(self, rid: str, peer_endpoint: str, sends: bool, heads: HeadRange | None) -> int:
        if heads is not None:
            raise KVTransferError("a worker's KV manager plans its own head slices: a handle takes no heads")
        with self._lock:
            if self._closed:
                raise KVTransferError("KV manager closed")
            own = WorkerKVEndpoint(self.backend, self._ranks)
            legs = list(enumerate(plan_legs(own, WorkerKVEndpoint.parse(peer_endpoint), sends)))
            tid, self._next_tid = self._next_tid, self._next_tid + 1
            self.local.start(tid, rid, sends, [(i, leg) for i, leg in legs if leg.rank == 0], strict=True)
            remote = [(i, leg) for i, leg in legs if leg.rank != 0]
            if remote:
                self._remote[tid] = {i: (leg.rank, int(KVPoll.Bootstrapping), "") for i, leg in remote}
                self._tell(StartKV(tid, rid, sends, [[i, leg.rank, leg.head, leg.peer] for i, leg in remote]))
            return tid

    def _tell(self, message: Any) -> None:
        assert self._control is not None, "legs on follower ranks before open_followers"
        self._control(message)

    def _drain_reports(self) -> None:
        while self._reports is not None and self._reports.poll(0):
            kind, _rank, changes, *_ = msgpack.unpackb(self._reports.recv())
            if kind != "legs":
                continue
            for tid, index, state, reason in changes:
                legs = self._remote.get(tid)
                if legs is not None and index in legs:
                    legs[index] = (legs[index][0], state, reason)

    def state_of(self, tid: int) -> tuple[KVPoll, str]:
        """The minimum over the transfer's legs, with the failed leg's reason."""
        with self._lock:
            self._drain_reports()
            states = [(h.poll(), h.failure_reason or "") for h in self.local.legs(tid).values()]
            states += [
                (KVPoll(s), f"tensor-parallel rank {rank}: {why}")
                for rank, s, why in self._remote.get(tid, {}).values()
            ]
            if not states:
                return KVPoll.Failed, "the transfer has no legs left"
            return min(states, key=lambda sw: sw[0])

    def send(self, tid: int, pages: list[int], is_last: bool, first_output: dict[str, Any] | None) -> None:
        with self._lock:
            self.local.send(tid, pages, is_last, first_output)
            if tid in self._remote:
                self._tell(SendKV(tid, [int(p) for p in pages], is_last, first_output))

    def init(self, tid: int, pages: list[int]) -> None:
        with self._lock:
            self.local.init(tid, pages)
            if tid in self._remote:
                self._tell(InitKV(tid, [int(p) for p in pages]))

    def first_output(self, tid: int) -> dict[str, Any] | None:
        with self._lock:
            legs = list(self.local.legs(tid).values())
            return legs[0].first_output if legs and isinstance(legs[0], KVReceiver) else None

    def end(self, tid: int, abort_reason: str | None) -> None:
        """Forgets the transfer on every rank; aborting its legs first when `abort_reason` is given."""
        with self._lock:
            if abort_reason is None:
                self.local.forget(tid)
            else:
                self.local.abort(tid, abort_reason)
            if self._remote.pop(tid, None) is not None and abort_reason is not None and not self._closed:
                self._tell(AbortKV(tid, abort_reason))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._control is not None:
                self._control(CloseKV())
            self.local.close()
            if self._reports is not None:
                self._reports.close()
                self._reports = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None


class _TPHandle:
    """What the sender and the receiver of rank 0 share: the transfer's number, a final state kept."""

    failure_reason: str | None

    def __init__(self, manager: TPKVManager, tid: int, rid: str):
        self.manager = manager
        self.tid = tid
        self.rid = rid
        self.failure_reason = None
        self._final: KVPoll | None = None

    def _poll(self) -> KVPoll:
        if self._final is not None:
            return self._final
        state, reason = self.manager.state_of(self.tid)
        if state == KVPoll.Failed:
            self._end(KVPoll.Failed, reason)
        elif state == KVPoll.Success:
            self._on_success()
            self._end(KVPoll.Success, None)
        return state

    def _on_success(self) -> None:
        pass

    def _end(self, state: KVPoll, reason: str | None) -> None:
        self._final = state
        self.failure_reason = reason
        self.manager.end(self.tid, reason)

    def _abort(self, reason: str) -> None:
        if self._final is None:
            self._end(KVPoll.Failed, reason)


class TPSender(_TPHandle, KVSender):
    def send(self, pages: list[int], is_last: bool, first_output: dict[str, Any] | None = None) -> None:
        if self._final is None:
            self.manager.send(self.tid, pages, is_last, first_output)

    def poll(self) -> KVPoll:
        return self._poll()

    def abort(self, reason: str = "aborted by the prefill worker") -> None:
        self._abort(reason)


class TPReceiver(_TPHandle, KVReceiver):
    def __init__(self, manager: TPKVManager, tid: int, rid: str):
        super().__init__(manager, tid, rid)
        self._first_output: dict[str, Any] | None = None

    def init(self, pages: list[int]) -> None:
        if self._final is None:
            self.manager.init(self.tid, pages)

    def poll(self) -> KVPoll:
        return self._poll()

    def _on_success(self) -> None:
        self._first_output = self.manager.first_output(self.tid)

    @property
    def first_output(self) -> dict[str, Any] | None:
        return self._first_output if self._final == KVPoll.Success else None

    def abort(self, reason: str = "aborted by the decode worker") -> None:
        self._abort(reason)


def open_worker_kv(
    backend: str,
    pool: PagedKVPool,
    worker_id: str,
    host: str,
    config: KVTransferConfig | None,
    options: dict[str, Any],
) -> TPKVManager:
    """Rank 0's manager over rank 0's pool (its KV heads come first: 0 .. n-1); with followers,
    `open_followers` adds theirs once the step channel exists."""
    heads = list(range(pool.shape.num_kv_heads))
    local = RankKV.open(backend, pool, worker_id, heads, host, config, **options)
    return TPKVManager(backend, local, pool, worker_id, config)
