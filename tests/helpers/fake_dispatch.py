"""Dispatch without processes: stand-in connections record what the router sends, and the test
delivers what the workers would answer, in any order."""

from __future__ import annotations

import asyncio

from pdserve.router.cluster.circuit_breaker import CircuitBreaker
from pdserve.router.cluster.pairing import Pairing
from pdserve.router.cluster.policies import make_decode_policy, make_policy
from pdserve.router.cluster.worker_pool import WorkerHandle, WorkerPool
from pdserve.router.serving.dispatch import Dispatcher
from pdserve.shared.cluster.worker_info import WorkerInfo
from pdserve.shared.protocol import AbortRequest, RequestOutput, ServerInfo


class FakeConn:
    connected = True

    def __init__(self) -> None:
        self.sent: list = []
        self.streams: dict[str, object] = {}

    def subscribe(self, rid: str, queue) -> None:
        self.streams[rid] = queue

    def unsubscribe(self, rid: str) -> None:
        self.streams.pop(rid, None)

    def send_nowait(self, msg) -> None:
        self.sent.append(msg)

    def send_abort(self, rid: str, message: str) -> None:
        self.sent.append(AbortRequest(rid=rid, message=message))

    def deliver(self, item, rid: str | None = None) -> None:
        self.streams[rid or item.rid].put_nowait(item)


def make_dispatcher(*workers: tuple[str, str], **dispatcher_args) -> tuple[Dispatcher, dict[str, FakeConn]]:
    pool = WorkerPool(make_policy("round_robin"))
    conns: dict[str, FakeConn] = {}
    for i, (worker_id, role) in enumerate(workers):
        conns[worker_id] = FakeConn()
        pool.workers[worker_id] = WorkerHandle(
            info=WorkerInfo(worker_id=worker_id, role=role, zmq_addr="tcp://x:1", kv_addr=f"tcp://kv:{i}"),
            conn=conns[worker_id],  # type: ignore[arg-type]
            breaker=CircuitBreaker(3, 10.0),
            server_info=ServerInfo(worker_id=worker_id, role=role),
        )
    pairing = Pairing(pool, make_policy("round_robin"), make_decode_policy("least_load"), 4)
    dispatcher_args.setdefault("max_attempts", 3)
    return Dispatcher(pool, pairing=pairing, **dispatcher_args), conns


def worker_output(
    rid: str, tokens: list[int], finished: bool = False, reason: dict | None = None
) -> RequestOutput:
    return RequestOutput(rid=rid, token_ids=tokens, finished=finished, finish_reason=reason)


async def next_item(outputs) -> object:
    return await asyncio.wait_for(outputs.__anext__(), 2.0)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)
