"""The workers this router knows, and which of them may take a request now (implements Membership).

    pool = WorkerPool(policy, PoolConfig(), on_server_info=state.learn_model)
    await pool.start()
    pool.add_static("tcp://127.0.0.1:30001")          # --worker-addr
    await pool.add_worker(info)                       # or ClusterView (Redis) calls this
    handle = pool.pick(input_ids, exclude=set())      # NoWorkerAvailable when none can serve
    handle = pool.pick(ids, exclude, role="prefill", policy=prefill_policy)   # one role, its policy

Rules:
- a worker becomes a candidate once its ServerInfo arrived (asked for right after connecting, and
  again every poll until it answers): the router needs the model facts it carries;
- a candidate is: connected, not leaving, its role can generate (mixed, or decode: a decode
  worker prefills locally what comes without a prefill partner), its circuit breaker allows it,
  and not in `exclude` (workers already tried for this request); `role="prefill"` asks for prefill
  workers instead (they only ever serve half of a pair, router/cluster/pairing.py);
- alive and busy are different facts. Alive is the connection's (router/cluster/worker_conn.py): ZMTP
  heartbeats answered by the worker's ZMQ I/O thread, which a long step cannot silence; a worker
  that dies, freezes or vanishes loses its connection within `Heartbeat.timeout_s`, and its
  requests fail at once (dispatch retries or moves them). Busy is progress: a worker that is
  alive but slow is never failed for it; a request that waits too long ends by its own deadline
  (`--request-timeout`, router/serving/dispatch.py);
- every `poll_interval_s` each connected worker gets a LoadQuery (one at a time: a worker in a
  long step answers late, and its last report stands meanwhile);
- `remove_worker(id)`: the worker left (drains): it takes no new requests, keeps the streams it
  runs until they end, and is dropped then (or when its connection drops, which fails them);
  `remove_worker(id, expired=True)`: its membership key expired. A worker whose connection is
  still up (heartbeats answered) is kept: Redis restarted or is unreachable from the worker, and
  the worker registers again by itself; otherwise it is dropped and its requests fail at once;
- `add_worker` of a known id with the same address and start time only refreshes its info (and
  takes back a leave), otherwise it replaces the old connection;
- static workers (`add_static`) are keyed by their address until their ServerInfo names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq.asyncio

from pdserve.router.cluster.circuit_breaker import BreakerState, CircuitBreaker
from pdserve.router.cluster.policies import Policy
from pdserve.router.cluster.worker_conn import Heartbeat, WorkerConnection, WorkerUnavailable
from pdserve.shared.cluster.worker_info import WorkerInfo
from pdserve.shared.protocol import LoadQuery, LoadReport, ServerInfo, ServerInfoQuery

logger = logging.getLogger(__name__)

# Roles that stream a request's tokens (a decode worker prefills locally when no prefill worker
# is paired with it). Prefill workers are offered only through `pick(..., role="prefill")`.
GENERATE_ROLES = ("mixed", "decode")


class NoWorkerAvailable(Exception):
    """No worker can take the request; the message says why (for a 503)."""


@dataclass
class PoolConfig:
    poll_interval_s: float = 0.5
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    query_timeout_s: float = 5.0
    breaker_failure_threshold: int = 3
    breaker_cooldown_s: float = 10.0


@dataclass
class WorkerHandle:
    info: WorkerInfo
    conn: WorkerConnection
    breaker: CircuitBreaker
    server_info: ServerInfo | None = None
    last_load: LoadReport | None = None
    inflight: int = 0  # requests of this router on the worker now
    leaving: bool = False  # it left the cluster (drains): no new requests
    load_query_pending: bool = False
    added_at: float = field(default_factory=time.monotonic)
    # tokens/s generated between the last two of the worker's own load reports (SGLang's
    # last_gen_throughput), and the (time, generated_tokens) of the last report
    gen_throughput: float = 0.0
    _gen_mark: tuple[float, int] | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def record_load(self, report: LoadReport) -> LoadReport:
        """Keeps the worker's own load report (and what it says about its generation rate)."""
        now = time.monotonic()
        mark = self._gen_mark
        if mark is not None and now > mark[0] and report.generated_tokens >= mark[1]:
            self.gen_throughput = (report.generated_tokens - mark[1]) / (now - mark[0])
        self._gen_mark = (now, report.generated_tokens)
        self.last_load = report
        return report

    @property
    def role(self) -> str:
        return self.server_info.role if self.server_info else self.info.role

    @property
    def load(self) -> int:
        """Queued + running requests: this router's own count, or the worker's (other routers' too)."""
        reported = self.last_load.num_running + self.last_load.num_waiting if self.last_load else 0
        return max(self.inflight, reported)

    @property
    def kv_addr(self) -> str:
        """The KV transfer endpoint of a prefill or decode worker (Redis, else its ServerInfo)."""
        if self.info.kv_addr:
            return self.info.kv_addr
        args = self.server_info.args if self.server_info else {}
        return str(args.get("kv_addr") or "")

    @property
    def kv_cache_dtype(self) -> str:
        """The worker's `--kv-cache-dtype` (its ServerInfo): a P/D pair must store KV alike."""
        args = self.server_info.args if self.server_info else {}
        return str(args.get("kv_cache_dtype") or "auto")

    @property
    def free_page_fraction(self) -> float:
        """Free + evictable KV pages over all pages, as last reported (1.0 before any report)."""
        load = self.last_load
        if load is None or load.num_total_pages <= 0:
            return 1.0
        return (load.num_free_pages + load.num_evictable_pages) / load.num_total_pages

    @property
    def live(self) -> bool:
        return self.server_info is not None and self.conn.connected and not self.leaving

    @property
    def can_serve(self) -> bool:
        return self.live and self.role in GENERATE_ROLES

    def can_serve_as(self, role: str | None) -> bool:
        """role None: can it stream a request (mixed or decode); else: is it a live worker of role."""
        return self.can_serve if role is None else self.live and self.role == role


class WorkerPool:
    def __init__(
        self,
        policy: Policy,
        config: PoolConfig | None = None,
        on_server_info: Callable[[ServerInfo], None] | None = None,
    ):
        self.policy = policy
        self.role_policies: list[Policy] = []  # the pairing's prefill/decode policies: told of removals
        self.config = config or PoolConfig()
        self._on_server_info = on_server_info
        self._ctx = zmq.asyncio.Context()
        self.workers: dict[str, WorkerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop(), name="worker-pool-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._tasks):
            task.cancel()
        for handle in list(self.workers.values()):
            await handle.conn.close()
        self.workers.clear()
        self._ctx.term()

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ Membership

    async def add_worker(self, info: WorkerInfo) -> None:
        old = self.workers.get(info.worker_id)
        if old is not None and old.info.zmq_addr == info.zmq_addr and old.info.started_at == info.started_at:
            old.info = info
            old.leaving = False
            return
        if old is not None:
            await self._drop(old, f"worker {info.worker_id} was replaced (restarted)")
        conn = WorkerConnection(
            self._ctx, info.zmq_addr, name=info.worker_id, heartbeat=self.config.heartbeat
        )
        breaker = CircuitBreaker(self.config.breaker_failure_threshold, self.config.breaker_cooldown_s)
        handle = WorkerHandle(info=info, conn=conn, breaker=breaker)
        self.workers[info.worker_id] = handle
        conn.start()
        logger.info("worker %s (%s) added at %s", info.worker_id, info.role, info.zmq_addr)
        self._spawn(self._fetch_server_info(handle), f"server-info-{info.worker_id}")

    async def remove_worker(self, worker_id: str, expired: bool = False) -> None:
        handle = self.workers.get(worker_id)
        if handle is None:
            return
        if expired:
            if handle.conn.connected:
                logger.warning(
                    "worker %s: its membership key expired but it answers heartbeats; kept", worker_id
                )
                return
            await self._drop(handle, f"worker {worker_id} is gone (membership expired, not connected)")
            return
        if not handle.leaving:
            logger.info(
                "worker %s left the cluster (%d stream(s) finish there)", worker_id, handle.conn.num_streams
            )
        handle.leaving = True
        if handle.conn.num_streams == 0:
            await self._drop(handle, f"worker {worker_id} left the cluster")

    def update_load(self, info: WorkerInfo) -> None:
        handle = self.workers.get(info.worker_id)
        if handle is None:
            return
        handle.info = info
        if handle.last_load is None:  # the worker's own LoadReport, when it has one, is fresher
            handle.last_load = LoadReport(
                num_running=info.num_running,
                num_waiting=info.num_waiting,
                num_free_pages=info.num_free_pages,
                num_total_pages=info.num_total_pages,
                page_size=info.page_size,
                max_total_num_tokens=info.max_total_num_tokens,
            )

    def add_static(self, address: str) -> None:
        """A `--worker-addr`: known by its address (role from its ServerInfo once it answers)."""
        self._spawn(
            self.add_worker(WorkerInfo(worker_id=address, role="mixed", zmq_addr=address)),
            f"add-static-{address}",
        )

    async def _drop(self, handle: WorkerHandle, reason: str) -> None:
        if self.workers.get(handle.worker_id) is handle:
            del self.workers[handle.worker_id]
        lost = handle.conn.fail_streams(reason)
        for policy in (self.policy, *self.role_policies):
            policy.on_removed(handle.worker_id)
        await handle.conn.close()
        logger.info("%s (%d request(s) in flight moved on)", reason, lost)

    # ------------------------------------------------------------------ choice

    def candidates(
        self, exclude: set[str] | frozenset[str] = frozenset(), role: str | None = None
    ) -> list[WorkerHandle]:
        return [
            h
            for h in self.workers.values()
            if h.worker_id not in exclude and h.can_serve_as(role) and h.breaker.would_allow()
        ]

    def pick(
        self,
        input_ids: Sequence[int],
        exclude: set[str] | frozenset[str] = frozenset(),
        role: str | None = None,
        policy: Policy | None = None,
    ) -> WorkerHandle:
        """A worker for the request (its breaker has let it through); NoWorkerAvailable if none.

        role None: a worker that streams whole requests, else a worker of that role; `policy`
        defaults to the pool's."""
        policy = policy or self.policy
        while True:
            candidates = self.candidates(exclude, role)
            if not candidates:
                raise NoWorkerAvailable(self.why_none(exclude))
            handle = policy.choose(candidates, input_ids)
            if handle.breaker.allow():
                return handle
            exclude = {*exclude, handle.worker_id}  # a half-open probe slot was just taken

    def why_none(
        self,
        exclude: set[str] | frozenset[str] = frozenset(),
        roles: tuple[str, ...] = GENERATE_ROLES,
        work: str = "run whole requests (it needs a decode partner)",
    ) -> str:
        """Each worker's reason for not taking work that `roles` can do (`work` names it)."""
        if not self.workers:
            return "No worker is registered with the router."
        parts = []
        for h in self.workers.values():
            if h.worker_id in exclude:
                state = "already tried for this request"
            elif h.server_info is None:
                state = "not answering yet"
            elif not h.conn.connected:
                state = "not connected"
            elif h.leaving:
                state = "leaving the cluster"
            elif h.role not in roles:
                state = f"role {h.role} cannot {work}"
            elif h.breaker.state != BreakerState.CLOSED:
                state = "circuit open after repeated failures"
            else:
                state = "busy"
            parts.append(f"{h.worker_id}: {state}")
        return "No worker available (" + "; ".join(parts) + ")."

    def serving_workers(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.can_serve and h.breaker.would_allow()]

    def by_role(self) -> dict[str, list[str]]:
        """Live (connected, answering) workers by role."""
        roles: dict[str, list[str]] = {"mixed": [], "prefill": [], "decode": []}
        for h in self.workers.values():
            if h.live:
                roles.setdefault(h.role, []).append(h.worker_id)
        return roles

    # ------------------------------------------------------------------ background work

    async def _fetch_server_info(self, handle: WorkerHandle) -> None:
        """Asks until the worker answers (it may still be loading) or leaves the pool."""
        while self.workers.get(handle.worker_id) is handle and handle.server_info is None:
            try:
                info = await handle.conn.query(ServerInfoQuery(), ServerInfo, self.config.query_timeout_s)
            except (WorkerUnavailable, TimeoutError, asyncio.TimeoutError):
                await asyncio.sleep(self.config.poll_interval_s)
                continue
            self._set_server_info(handle, info)

    def _set_server_info(self, handle: WorkerHandle, info: ServerInfo) -> None:
        handle.server_info = info
        logger.info(
            "worker %s serves %s (%s, context %d, %d KV tokens)",
            handle.worker_id,
            info.model_path,
            info.role,
            info.context_length,
            info.max_total_num_tokens,
        )
        if self._on_server_info is not None:
            self._on_server_info(info)

    async def refresh_server_info(self) -> None:
        """Asks every connected worker for its ServerInfo again (after a weights update)."""
        handles = [h for h in self.workers.values() if h.conn.connected]
        results = await asyncio.gather(
            *(h.conn.query(ServerInfoQuery(), ServerInfo, self.config.query_timeout_s) for h in handles),
            return_exceptions=True,
        )
        for handle, result in zip(handles, results):
            if isinstance(result, ServerInfo):
                self._set_server_info(handle, result)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            for handle in list(self.workers.values()):
                if handle.leaving and handle.conn.num_streams == 0:
                    await self._drop(handle, f"worker {handle.worker_id} left the cluster")
                elif handle.conn.connected and not handle.load_query_pending:
                    self._spawn(self._poll_load(handle), f"load-{handle.worker_id}")

    async def _poll_load(self, handle: WorkerHandle) -> None:
        handle.load_query_pending = True
        try:
            handle.record_load(await handle.conn.query(LoadQuery(), LoadReport, self.config.query_timeout_s))
        except (WorkerUnavailable, TimeoutError, asyncio.TimeoutError):
            pass  # busy in a long step, or gone: the last report stands
        finally:
            handle.load_query_pending = False
