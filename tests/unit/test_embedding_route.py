"""Which worker computes an embedding (router/cluster/embedding_route.py), without processes: the
pool's handles carry a stand-in connection and a ServerInfo naming their role."""

from __future__ import annotations

import pytest

from pdserve.router.cluster.circuit_breaker import CircuitBreaker
from pdserve.router.cluster.embedding_route import pick_embedding_worker
from pdserve.router.cluster.policies import make_policy
from pdserve.router.cluster.worker_pool import NoWorkerAvailable, WorkerHandle, WorkerPool
from pdserve.shared.cluster.worker_info import WorkerInfo
from pdserve.shared.protocol import ServerInfo


class _Conn:
    connected = True


def _pool(*roles: tuple[str, str | None]) -> WorkerPool:
    """roles: (worker_id, role; None for a worker that has not answered yet)."""
    pool = WorkerPool(make_policy("round_robin"))
    for worker_id, role in roles:
        pool.workers[worker_id] = WorkerHandle(
            info=WorkerInfo(worker_id=worker_id, role="mixed", zmq_addr="tcp://x:1"),
            conn=_Conn(),  # type: ignore[arg-type]
            breaker=CircuitBreaker(3, 10.0),
            server_info=None if role is None else ServerInfo(worker_id=worker_id, role=role, args={}),
        )
    return pool


def test_prefill_and_mixed_workers_compute_embeddings_never_decode():
    pool = _pool(("p", "prefill"), ("d", "decode"), ("m", "mixed"))
    picked = {pick_embedding_worker(pool, [1, 2, 3]).worker_id for _ in range(6)}
    assert picked == {"p", "m"}
    assert pick_embedding_worker(pool, [1], exclude={"p"}).worker_id == "m"


def test_the_refusal_names_each_workers_reason():
    pool = _pool(("p", None), ("d", "decode"))
    with pytest.raises(NoWorkerAvailable) as refused:
        pick_embedding_worker(pool, [1, 2, 3])
    message = str(refused.value)
    assert "p: not answering yet" in message
    assert "d: role decode cannot compute embeddings" in message
    assert "busy" not in message
