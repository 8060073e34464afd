"""Weights updates at the worker (`UpdateWeightsRequest` over ZMQ), and its `ServerInfo`.

A real `worker --role mixed` process serves checkpoint A (tiny random Llama); B is A with every tensor
perturbed (same names and shapes, other values). Expected outputs come from in-process engines on
A and B (greedy, float32). Checked:
1. ServerInfo carries the worker's id, flags, model facts and version;
2. A → B: "Succeeded to update model weights.", an unnamed version "a" → "1", outputs become B's,
   the radix cache is flushed (a repeated prompt has no cached tokens); B → A with an explicit
   weight_version sets it;
3. failures (missing path: SGLang's exact message; a tensor of another shape; another architecture)
   name the problem and leave the old weights serving and the version unchanged;
4. a request running when the update arrives finishes with the OLD weights; a request arriving
   while the update drains is held and then runs with the NEW weights, after the running one ended;
   a held request can be aborted;
5. a request that outlives the drain timeout is aborted with a clear message, and the update goes
   through.
4 and 5 run the worker loop on a thread of the test process (real engine, real ZMQ sockets), so the
test can wait for the moment the update starts draining instead of guessing it with sleeps.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.weight_swap import UPDATE_OK
from pdserve.shared.protocol import AbortRequest, GenerateRequest, OutputBatch
from pdserve.shared.worker.client import WorkerClient
from pdserve.shared.worker.metrics import WorkerMetrics
from pdserve.shared.worker.mixed import MixedWorker
from pdserve.shared.worker.update_queue import DEFAULT_DRAIN_TIMEOUT_S, drain_timeout_message
from pdserve.shared.worker.zmq_io import DealerSocket, RouterSocket
from tests.helpers.checkpoint_copies import misshapen_copy, perturbed_copy
from tests.helpers.tiny_models import make_tiny_model

POOL_TOKENS = 2048
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(40)]  # 40 tokens: two full pages get cached
SHORT = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
# long enough to still run ~1 s after the update arrives (about 1-2 ms per decode step here)
LONG = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = Path(tmp_path_factory.mktemp("weights"))
    a = make_tiny_model("llama", root / "a")
    return {
        "a": str(a),
        "b": str(perturbed_copy(a, root / "b", seed=7)),
        "misshapen": str(misshapen_copy(a, root / "misshapen", "model.layers.1.mlp.up_proj.weight")),
        "mistral": str(make_tiny_model("mistral", root / "mistral")),
    }


@pytest.fixture(scope="module")
def reference(checkpoints) -> dict[tuple[str, str], list[int]]:
    """(checkpoint, "short"|"long") -> greedy output ids of PROMPT, from an in-process engine
    ("long" for A only)."""
    out = {}
    for name in ("a", "b"):
        engine = Engine(
            EngineArgs(model_path=checkpoints[name], dtype="float32", max_total_tokens=POOL_TOKENS)
        )
        for kind, params in (("short", SHORT), ("long", LONG)) if name == "a" else (("short", SHORT),):
            out[(name, kind)] = engine.generate([PROMPT], params)[0]["output_ids"]
    assert out[("a", "short")] != out[("b", "short")]
    return out


@pytest.fixture(scope="module")
def worker(worker_launcher, checkpoints):
    return worker_launcher(
        "--model-path", checkpoints["a"], "--dtype", "float32", "--max-total-tokens", str(POOL_TOKENS),
        "--log-level", "warning",
    )  # fmt: skip


@pytest.fixture
def client(worker):
    with WorkerClient(worker.zmq_address) as c:
        yield c


def _generate(client: WorkerClient, rid: str, params=SHORT) -> tuple[list[int], int]:
    """(output ids, cached_tokens) of PROMPT."""
    client.submit(GenerateRequest(rid=rid, input_ids=PROMPT, sampling_params=params))
    outs = client.collect(rid, timeout_s=60)
    assert outs[-1].error is None, outs[-1].error
    return [t for o in outs for t in o.token_ids], outs[-1].cached_tokens


def _serve_a(client: WorkerClient, checkpoints) -> None:
    """Puts the worker back on A (tests do not depend on each other's order)."""
    result = client.update_weights(checkpoints["a"], weight_version="a")
    assert result.success, result.message


def test_server_info_reports_worker_and_model_facts(client, checkpoints):
    info = client.server_info()
    assert info.worker_id.startswith("mixed@127.0.0.1:")
    assert info.role == "mixed"
    assert info.args["role"] == "mixed" and info.args["page_size"] == 16 and info.args["dtype"] == "float32"
    assert info.args["port"] == int(info.worker_id.rsplit(":", 1)[1])
    assert info.args["max_total_tokens"] == POOL_TOKENS
    assert info.model_type == "llama" and info.architectures == ["LlamaForCausalLM"]
    assert (info.context_length, info.vocab_size, info.page_size) == (1024, 512, 16)
    assert info.max_total_num_tokens == POOL_TOKENS
    # 3 layers x K and V x (pool pages + the reserved page) x 16 tokens x 2 heads x 16 dims x 4 bytes
    assert info.kv_pool_bytes == 3 * 2 * (POOL_TOKENS // 16 + 1) * 16 * 2 * 16 * 4
    assert info.served_model_name == info.tokenizer_path == checkpoints["a"]
    assert info.version == importlib.metadata.version("pdserve")


def test_update_switches_outputs_flushes_cache_and_sets_version(client, checkpoints, reference):
    _serve_a(client, checkpoints)
    assert _generate(client, "a-1") == (reference[("a", "short")], 0)
    assert _generate(client, "a-2") == (reference[("a", "short")], 32)  # two pages from the radix cache

    result = client.update_weights(checkpoints["b"])
    # "a" has no trailing number, so an unnamed update after it is "1"; numbered ones count up
    assert (result.success, result.message, result.weight_version) == (True, UPDATE_OK, "1")
    info = client.server_info()
    assert (info.model_path, info.weight_version) == (checkpoints["b"], result.weight_version)
    assert _generate(client, "b-1") == (reference[("b", "short")], 0)  # flushed: nothing cached

    result = client.update_weights(checkpoints["a"], weight_version="v41")
    assert (result.success, result.weight_version) == (True, "v41")
    result = client.update_weights(checkpoints["a"])
    assert (result.success, result.weight_version) == (True, "v42")
    assert _generate(client, "a-3") == (reference[("a", "short")], 0)


@pytest.mark.parametrize(
    "which, expected",
    [
        (
            "/no/such/checkpoint",
            "Failed to get weights iterator: /no/such/checkpoint (repository not found).",
        ),
        (
            "misshapen",
            (
                "Failed to update weights: tensor model.layers.1.mlp.up_proj.weight has shape [64, 64] "
                "in the checkpoint, [128, 64] in the served model."
            ),
        ),
        (
            "mistral",
            (
                "Failed to update weights: {path} is a ['MistralForCausalLM'] model, the served model "
                "is ['LlamaForCausalLM']."
            ),
        ),
    ],
)
def test_failed_update_names_the_problem_and_keeps_old_weights(
    client, checkpoints, reference, which, expected
):
    _serve_a(client, checkpoints)
    path = checkpoints.get(which, which)
    result = client.update_weights(path)
    assert result.success is False
    assert result.message == expected.format(path=path)
    assert result.weight_version == "a"
    assert client.server_info().weight_version == "a"
    assert _generate(client, f"after-{which}")[0] == reference[("a", "short")]


@dataclass
class InProcessWorker:
    loop: MixedWorker
    address: str


@pytest.fixture(scope="module")
def in_process(checkpoints) -> Iterator[InProcessWorker]:
    """The worker loop on its own thread in this process (real engine, real ZMQ sockets), so a test
    can see when an update starts draining (`loop.updates.holding`) and set the drain timeout."""
    engine = Engine(EngineArgs(model_path=checkpoints["a"], dtype="float32", max_total_tokens=POOL_TOKENS))
    ctx = zmq.Context()
    server = RouterSocket(ctx, "tcp://127.0.0.1:0")
    stop = threading.Event()
    loop = MixedWorker(engine, server, WorkerMetrics("mixed", "tiny"), stop)
    thread = threading.Thread(target=loop.serve, name="worker-loop")
    thread.start()
    try:
        yield InProcessWorker(loop, server.address)
    finally:
        stop.set()
        thread.join(30)
        server.close()
        ctx.term()


class OutputLog:
    """Every output a DEALER receives, in arrival order, as (rid, finished, token ids)."""

    def __init__(self, sock: DealerSocket):
        self.sock = sock
        self.entries: list[tuple[str, bool, list[int]]] = []

    def read_until(self, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; outputs so far: {[(r, f) for r, f, _ in self.entries][-5:]}"
            msg = self.sock.recv(int(min(left, 0.05) * 1000) + 1)
            if isinstance(msg, OutputBatch):
                self.entries.extend((o.rid, o.finished, o.token_ids) for o in msg.outputs)

    def started(self, rid: str) -> bool:
        return any(r == rid for r, _, _ in self.entries)

    def finished(self, rid: str) -> bool:
        return any(r == rid and f for r, f, _ in self.entries)

    def ids(self, rid: str) -> list[int]:
        return [t for r, _, ids in self.entries if r == rid for t in ids]


def test_running_request_finishes_on_old_weights_and_new_arrival_waits(in_process, checkpoints, reference):
    ctx = zmq.Context()
    sock = DealerSocket(ctx, in_process.address)
    log = OutputLog(sock)
    results = []
    try:
        with WorkerClient(in_process.address) as admin:
            _serve_a(admin, checkpoints)
            sock.send(GenerateRequest(rid="running", input_ids=PROMPT, sampling_params=LONG))
            log.read_until(lambda: log.started("running"))

            def update() -> None:
                with WorkerClient(in_process.address) as updater:
                    results.append(updater.update_weights(checkpoints["b"]))

            thread = threading.Thread(target=update)
            thread.start()
            log.read_until(lambda: in_process.loop.updates.holding or log.finished("running"))
            assert not log.finished("running"), "the long request ended before the update drained"
            sock.send(GenerateRequest(rid="arriving", input_ids=PROMPT, sampling_params=SHORT))
            sock.send(GenerateRequest(rid="cancelled", input_ids=PROMPT, sampling_params=SHORT))
            sock.send(AbortRequest(rid="cancelled"))  # held requests can be aborted too
            log.read_until(lambda: log.finished("cancelled"))
            assert not log.finished("running")
            log.read_until(lambda: log.finished("arriving"))
            thread.join(30)
    finally:
        sock.close()
        ctx.term()

    assert results and results[0].success, results
    assert log.ids("running") == reference[("a", "long")]  # untouched by the swap
    assert log.ids("arriving") == reference[("b", "short")]  # held, then served by the new weights
    assert [(f, ids) for r, f, ids in log.entries if r == "cancelled"] == [(True, [])]
    order = [rid for rid, _, _ in log.entries]
    assert order.index("arriving") > max(i for i, rid in enumerate(order) if rid == "running")


def test_drain_timeout_aborts_stragglers_then_updates(in_process, checkpoints, reference):
    in_process.loop.updates.drain_timeout_s = 0.3
    try:
        with WorkerClient(in_process.address) as c:
            _serve_a(c, checkpoints)
            endless = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}
            c.submit(GenerateRequest(rid="endless", input_ids=PROMPT, sampling_params=endless))
            next(c.stream("endless"))  # running
            result = c.update_weights(checkpoints["b"], timeout_s=30)
            assert (result.success, result.message, result.weight_version) == (True, UPDATE_OK, "1")
            last = c.collect("endless")[-1]
            assert last.finished
            assert last.finish_reason == {"type": "abort", "message": drain_timeout_message(0.3)}
            assert 0 < last.completion_tokens < 900
            assert _generate(c, "after")[0] == reference[("b", "short")]
    finally:
        in_process.loop.updates.drain_timeout_s = DEFAULT_DRAIN_TIMEOUT_S
