"""A worker whose client is gone drops what that client had running (real ZMQ sockets, real engine).

Two DEALER clients stream long requests from one MixedWorker loop in a thread. One client closes
its socket (as a router that died, or whose connection missed its heartbeats: the router has moved
those requests on by then): the worker's next send to it finds no connection, its request is
aborted and its pages are freed, while the other client's request streams on to its end.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest
import zmq

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import GenerateRequest, OutputBatch
from pdserve.shared.worker.metrics import WorkerMetrics
from pdserve.shared.worker.mixed import MixedWorker
from pdserve.shared.worker.zmq_io import DealerSocket, RouterSocket
from tests.helpers.tiny_models import make_tiny_model

LONG = {"temperature": 0.0, "max_new_tokens": 700, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


def _tokens(client: DealerSocket, rid: str, until: int) -> tuple[int, bool]:
    """Reads the client's frames until `until` tokens of rid came (or it finished)."""
    got, finished = 0, False
    while got < until and not finished:
        batch = client.recv(timeout_ms=30_000)
        assert isinstance(batch, OutputBatch), batch
        for out in batch.outputs:
            if out.rid == rid:
                got += len(out.token_ids)
                finished = finished or out.finished
    return got, finished


def test_a_gone_client_s_requests_are_aborted_and_the_others_go_on(model_dir):
    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=4096))
    ctx = zmq.Context()
    stop = threading.Event()
    address: queue.Queue[str] = queue.Queue()

    def serve() -> None:
        server = RouterSocket(ctx, "tcp://127.0.0.1:0")
        address.put(server.address)
        try:
            MixedWorker(engine, server, WorkerMetrics("mixed", model_dir), stop, idle_poll_ms=5).serve()
        finally:
            server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    addr = address.get(timeout=10)
    leaving, staying = DealerSocket(ctx, addr), DealerSocket(ctx, addr)
    try:
        leaving.send(GenerateRequest("gone", [5, 6, 7], LONG))
        staying.send(GenerateRequest("stays", [8, 9, 10], LONG))
        got, finished = _tokens(leaving, "gone", 5)
        assert got >= 5 and not finished
        leaving.close()
        deadline = time.monotonic() + 10
        while engine.stats.num_aborted == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # aborted, not run to its end for nobody (without the check it finished like the other)
        assert engine.stats.num_aborted == 1
        got, finished = _tokens(staying, "stays", 10_000)
        assert finished and got == LONG["max_new_tokens"]
    finally:
        stop.set()
        thread.join(30)
        staying.close()
        ctx.term()
    load = engine.load()
    assert load.num_running == 0 and load.num_free_pages + load.num_evictable_pages == load.num_total_pages
