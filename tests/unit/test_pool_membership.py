"""What the router's pool does when membership says a worker is gone (router/cluster/worker_pool.py).

A "leave" (a draining worker) takes it out of the choice at once but keeps its streams until they
end; an expired key drops a worker only when its connection is down too (a Redis that restarted
empty must not empty the pool); an add of the same worker takes a leave back.
"""

from __future__ import annotations

import asyncio

from pdserve.router.cluster.circuit_breaker import CircuitBreaker
from pdserve.router.cluster.policies import make_policy
from pdserve.router.cluster.worker_pool import WorkerHandle, WorkerPool
from pdserve.shared.cluster.worker_info import WorkerInfo
from pdserve.shared.protocol import ServerInfo


class Conn:
    def __init__(self, connected: bool = True, streams: int = 0) -> None:
        self.connected = connected
        self.num_streams = streams
        self.closed = False
        self.failed: list[str] = []

    def fail_streams(self, reason: str) -> int:
        self.failed.append(reason)
        n, self.num_streams = self.num_streams, 0
        return n

    async def close(self) -> None:
        self.closed = True


def _pool(conn: Conn) -> tuple[WorkerPool, WorkerInfo]:
    pool = WorkerPool(make_policy("round_robin"))
    info = WorkerInfo(worker_id="w", role="mixed", zmq_addr="tcp://x:1", started_at=1.0)
    pool.workers["w"] = WorkerHandle(
        info=info,
        conn=conn,
        breaker=CircuitBreaker(),
        server_info=ServerInfo(worker_id="w"),  # type: ignore[arg-type]
    )
    return pool, info


def test_an_expired_key_keeps_a_connected_worker_and_drops_a_disconnected_one():
    async def main() -> None:
        pool, _ = _pool(Conn(connected=True, streams=2))
        await pool.remove_worker("w", expired=True)
        assert [h.worker_id for h in pool.candidates()] == ["w"]
        pool.workers["w"].conn.connected = False
        await pool.remove_worker("w", expired=True)
        assert pool.workers == {}

    asyncio.run(main())


def test_a_leave_stops_new_requests_and_keeps_the_streams_until_they_end():
    async def main() -> None:
        conn = Conn(streams=1)
        pool, info = _pool(conn)
        await pool.remove_worker("w")
        assert pool.candidates() == [] and "w" in pool.workers
        assert conn.failed == [] and not conn.closed  # its stream finishes there
        await pool.add_worker(info)  # it announced itself again (same address, same start)
        assert [h.worker_id for h in pool.candidates()] == ["w"]
        await pool.remove_worker("w")
        conn.num_streams = 0
        await pool.remove_worker("w")  # nothing runs there any more: dropped now
        assert pool.workers == {} and conn.closed

    asyncio.run(main())
