"""The mixed worker's loop around an engine with overlap scheduling forced on (CPU, tiny Llama).

The loop sends, after each engine step, the outputs of the decode step launched in the step before:
streams must still carry exactly the in-order engine's tokens, one output per request per frame
with counts that add up; an abort mid-stream and a shutdown while a step is in flight must leave
every page free.
"""

from __future__ import annotations

import queue
import random
import threading
from pathlib import Path

import pytest
import zmq

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import AbortRequest, GenerateRequest, OutputBatch, RequestOutput
from pdserve.shared.worker.metrics import WorkerMetrics
from pdserve.shared.worker.mixed import SHUTDOWN_MESSAGE, MixedWorker
from pdserve.shared.worker.zmq_io import DealerSocket, RouterSocket
from tests.helpers.tiny_models import make_tiny_model

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


def _engine(model_dir: str, overlap: bool) -> Engine:
    args = EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=2048)
    return Engine(args, overlap_schedule=overlap)


class LoopInThread:
    """A MixedWorker serving `engine` in a thread that owns its ROUTER socket."""

    def __init__(self, engine: Engine, model_dir: str):
        self.engine = engine
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        self._address: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, args=(model_dir,), daemon=True)
        self._thread.start()
        self.client = DealerSocket(self.ctx, self._address.get(timeout=10))

    def _serve(self, model_dir: str) -> None:
        server = RouterSocket(self.ctx, "tcp://127.0.0.1:0")
        self._address.put(server.address)
        try:
            MixedWorker(
                self.engine,
                server,
                WorkerMetrics("mixed", model_dir),
                self.stop,
                idle_poll_ms=5,
                shutdown_drain_s=0,  # a stop aborts what runs (the step in flight included)
            ).serve()
        finally:
            server.close()

    def recv(self) -> list[RequestOutput]:
        batch = self.client.recv(timeout_ms=30_000)
        assert isinstance(batch, OutputBatch), batch
        rids = [o.rid for o in batch.outputs]
        assert len(rids) == len(set(rids)), f"one output per request per frame, got {rids}"
        return batch.outputs

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        self.client.close()
        self.ctx.term()


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.choice((1, 6, 30)))] for _ in range(n)]


def _pages_back(engine: Engine) -> bool:
    load = engine.load()
    return load.num_running == 0 and load.num_free_pages + load.num_evictable_pages == load.num_total_pages


def test_streams_equal_in_order_generate_and_an_abort_frees_its_pages(model_dir):
    prompts = _prompts(4, seed=1)
    reference = _engine(model_dir, False).generate(prompts, GREEDY)
    engine = _engine(model_dir, True)
    loop = LoopInThread(engine, model_dir)
    try:
        loop.client.send(GenerateRequest("long", prompts[0], {**GREEDY, "max_new_tokens": 500}))
        for i, ids in enumerate(prompts[1:], start=1):
            loop.client.send(GenerateRequest(f"p{i}", ids, GREEDY))
        streamed: dict[str, list[int]] = {"long": [], "p1": [], "p2": [], "p3": []}
        finals: dict[str, RequestOutput] = {}
        aborted = False
        while len(finals) < 4:
            for out in loop.recv():
                streamed[out.rid].extend(out.token_ids)
                assert out.completion_tokens == len(streamed[out.rid])
                if out.finished:
                    finals[out.rid] = out
            if not aborted and len(streamed["long"]) >= 20:
                loop.client.send(AbortRequest(rid="long", message="enough"))
                aborted = True
    finally:
        loop.close()
    assert engine.pipeline.num_overlapped_steps > 0
    for i in (1, 2, 3):
        assert streamed[f"p{i}"] == reference[i]["output_ids"]
        assert finals[f"p{i}"].finish_reason == reference[i]["meta_info"]["finish_reason"]
    assert finals["long"].finish_reason == {"type": "abort", "message": "enough"}
    long_ref = _engine(model_dir, False).generate([prompts[0]], {**GREEDY, "max_new_tokens": 500})[0]
    assert (
        20 <= len(streamed["long"]) < 500
        and streamed["long"] == long_ref["output_ids"][: len(streamed["long"])]
    )
    assert _pages_back(engine)


def test_shutdown_with_a_step_in_flight_aborts_and_frees_everything(model_dir):
    engine = _engine(model_dir, True)
    loop = LoopInThread(engine, model_dir)
    try:
        loop.client.send(GenerateRequest("a", _prompts(1, seed=2)[0], {**GREEDY, "max_new_tokens": 10_000}))
        got = 0
        while got < 5:
            got += sum(len(o.token_ids) for o in loop.recv())
        loop.stop.set()
        final = None
        while final is None:
            final = next((o for o in loop.recv() if o.finished), None)
    finally:
        loop.close()
    assert final.finish_reason == {"type": "abort", "message": SHUTDOWN_MESSAGE}
    assert engine.pipeline.in_flight is None and _pages_back(engine)
