"""The mixed worker as a real process: ZMQ streaming, aborts, refusals, /metrics, SIGTERM.

One `worker --role mixed` process (tiny random Llama, CPU, float32) serves the first four tests
through real DEALER sockets on loopback; the SIGTERM test starts its own. Checked:
1. greedy streams of several concurrent prompts: one OutputBatch frame per step holding every
   request of the client that progressed, one new token per output, and ids equal to the
   in-process `Engine.generate` of the same model and params;
2. an abort (sent by another client) ends one stream with finish_reason abort while a concurrent
   request finishes normally; afterwards no request is live and every page is free or evictable;
3. refused requests (bad temperature, empty input_ids, token id >= vocab, unknown parameter,
   malformed frame) each get one finished error output naming the field; the worker keeps serving;
4. /metrics shows the expected names with values that match the traffic sent;
5. SIGTERM mid-request with `--drain-timeout 0`: the client gets an abort output, exit status 0
   within seconds, no children.
Plus: the one-shot client CLI and the demo (the README's run line) work end to end, an in-process
worker loop refuses requests that arrive during shutdown, and the disaggregated roles exit 2 for now.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import zmq

from pdserve.shared.args import EngineArgs
from pdserve.shared.protocol import GenerateRequest, OutputBatch
from pdserve.shared.worker.client import WorkerClient
from pdserve.shared.worker.metrics import WorkerMetrics
from pdserve.shared.worker.mixed import SHUTDOWN_MESSAGE, MixedWorker
from pdserve.shared.worker.zmq_io import DealerSocket, RouterSocket
from tests.helpers import zygote
from tests.helpers.tiny_models import make_tiny_model

POOL_TOKENS = 1024
PAGE_SIZE = 16
GREEDY = {"temperature": 0.0, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[str, int]:
    """(model directory, vocab size) of a tiny random Llama."""
    from transformers import AutoConfig

    model_dir = str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))
    return model_dir, AutoConfig.from_pretrained(model_dir).vocab_size


def _worker_flags(model_dir: str) -> list[str]:
    return [
        "--model-path", model_dir, "--dtype", "float32", "--device", "cpu",
        "--max-total-tokens", str(POOL_TOKENS), "--page-size", str(PAGE_SIZE), "--log-level", "warning",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def worker(worker_launcher, tiny_model):
    return worker_launcher(*_worker_flags(tiny_model[0]))


@pytest.fixture
def client(worker):
    with WorkerClient(worker.zmq_address) as c:
        yield c


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _metrics(http_url: str) -> dict[str, float]:
    """Unlabelled samples of /metrics as {name: value}."""
    text = urllib.request.urlopen(http_url + "/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# ---------------------------------------------------------------------- 1. streaming parity


@pytest.mark.slow
def test_concurrent_greedy_streams_match_engine_generate(worker, tiny_model):
    from pdserve.shared.engine.engine import Engine

    model_dir, vocab = tiny_model
    prompts = _prompts(vocab, [1, 5, 17, 40])
    ctx = zmq.Context()
    sock = DealerSocket(ctx, worker.zmq_address)
    try:
        for i, ids in enumerate(prompts):
            sock.send(GenerateRequest(rid=f"p{i}", input_ids=ids, sampling_params=GREEDY))
        streamed: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
        finals = {}
        batch_sizes = []
        while len(finals) < len(prompts):
            batch = sock.recv(timeout_ms=30_000)
            assert isinstance(batch, OutputBatch), batch
            rids = [o.rid for o in batch.outputs]
            assert len(rids) == len(set(rids)), f"one output per request per step, got {rids}"
            batch_sizes.append(len(rids))
            for out in batch.outputs:
                assert out.error is None
                assert len(out.token_ids) == 1, "a greedy step adds exactly one token per request"
                streamed[out.rid].extend(out.token_ids)
                assert out.completion_tokens == len(streamed[out.rid])
                if out.finished:
                    finals[out.rid] = out
    finally:
        sock.close()
        ctx.term()
    # all four decode together: some step's frame carries several requests' tokens
    assert max(batch_sizes) == len(prompts)

    engine = Engine(
        EngineArgs(
            model_path=model_dir,
            device="cpu",
            dtype="float32",
            max_total_tokens=POOL_TOKENS,
            page_size=PAGE_SIZE,
        )
    )
    expected = engine.generate(prompts, GREEDY)
    for i, ref in enumerate(expected):
        rid = f"p{i}"
        assert streamed[rid] == ref["output_ids"], rid
        assert finals[rid].finish_reason == ref["meta_info"]["finish_reason"]
        assert finals[rid].prompt_tokens == len(prompts[i])


# ---------------------------------------------------------------------- 2. abort


@pytest.mark.slow
def test_abort_mid_stream_leaves_other_request_and_pages_intact(worker, client, tiny_model):
    vocab = tiny_model[1]
    long_ids, short_ids = _prompts(vocab, [20, 7], seed=1)
    client.submit(
        GenerateRequest("long", long_ids, {"temperature": 0.0, "max_new_tokens": 800, "ignore_eos": True})
    )
    client.submit(
        GenerateRequest("short", short_ids, {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True})
    )
    long_stream = client.stream("long", timeout_s=30)
    got = 0
    while got < 3:
        out = next(long_stream)
        assert not out.finished
        got += len(out.token_ids)
    with WorkerClient(worker.zmq_address) as other:  # any client may abort; the owner gets the output
        other.abort("long", "stop it")
        long_rest = list(long_stream)
        short = client.collect("short", timeout_s=30)
        assert other.load().num_running == 0
    assert long_rest[-1].finished
    assert long_rest[-1].finish_reason == {"type": "abort", "message": "stop it"}
    assert 3 <= long_rest[-1].completion_tokens < 800
    assert short[-1].finish_reason == {"type": "length", "length": 12}
    assert sum(len(o.token_ids) for o in short) == 12

    load = client.load()
    assert (load.num_running, load.num_waiting) == (0, 0)
    assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages
    assert load.num_total_pages == POOL_TOKENS // PAGE_SIZE
    assert load.num_used_tokens == 0


# ---------------------------------------------------------------------- 3. refusals


@pytest.mark.slow
def test_invalid_requests_get_error_outputs_and_worker_keeps_serving(client, tiny_model):
    vocab = tiny_model[1]
    bad = {
        "bad-temp": (GenerateRequest("bad-temp", [5, 6], {"temperature": -0.5}), "temperature"),
        "empty": (GenerateRequest("empty", [], {}), "input_ids"),
        "big-id": (GenerateRequest("big-id", [5, vocab], {}), "input_ids"),
        "unknown": (GenerateRequest("unknown", [5], {"temprature": 0.1}), "temprature"),
        "not-dict": (GenerateRequest("not-dict", [5], "greedy"), "sampling_params"),  # type: ignore[arg-type]
    }
    for req, _ in bad.values():
        client.submit(req)
    client.send_raw(b"\xc1 not msgpack")  # dropped without a reply
    client.send_raw(msgpack.packb(["gen", {"rid": "malformed", "input_ids": [1], "colour": "red"}]))
    errors = {}
    for rid, (_, field_name) in bad.items():
        outs = client.collect(rid, timeout_s=10)
        assert len(outs) == 1, rid
        out = outs[0]
        assert out.finished and out.token_ids == []
        assert field_name in out.error, (rid, out.error)
        assert out.finish_reason == {"type": "abort", "message": out.error}
        errors[rid] = out.error
    assert str(vocab) in errors["big-id"]  # the message gives the allowed range
    malformed = client.collect("malformed", timeout_s=10)
    assert malformed[0].finished and "colour" in malformed[0].error

    ok = client.collect(client_submit(client, GenerateRequest("ok", [5, 6, 7], GREEDY)), timeout_s=30)
    assert ok[-1].error is None and ok[-1].finish_reason["type"] in ("length", "stop")


def client_submit(client: WorkerClient, req: GenerateRequest) -> str:
    client.submit(req)
    return req.rid


# ---------------------------------------------------------------------- 4. metrics


@pytest.mark.slow
def test_metrics_follow_traffic(worker, client, tiny_model):
    vocab = tiny_model[1]
    time.sleep(0.3)  # > the loop's publish interval: earlier tests' last tokens are counted
    before = _metrics(worker.http_url)
    shared = _prompts(vocab, [3 * PAGE_SIZE], seed=2)[0]
    params = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}
    client.collect(client_submit(client, GenerateRequest("m1", shared + [7], params)), timeout_s=30)
    m2 = client.collect(client_submit(client, GenerateRequest("m2", shared + [8, 9], params)), timeout_s=30)
    assert m2[-1].cached_tokens == len(shared)  # m1's three whole pages
    prompt_tokens = 2 * len(shared) + 3

    deadline = time.monotonic() + 5
    while True:  # the loop publishes a snapshot at most every 0.25 s
        after = _metrics(worker.http_url)
        delta = {k: after[k] - before.get(k, 0.0) for k in after}
        if delta["pdserve_worker_generation_tokens_total"] >= 12 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delta["pdserve_worker_prompt_tokens_total"] == prompt_tokens
    assert delta["pdserve_worker_generation_tokens_total"] == 12
    assert delta["pdserve_worker_requests_total"] == 2
    assert delta["pdserve_worker_cached_tokens_total"] == len(shared)
    assert delta["pdserve_worker_prefill_tokens_computed_total"] == prompt_tokens - len(shared)
    assert delta["pdserve_worker_decode_tokens_computed_total"] == 2 * 5  # first token comes from prefill
    assert (
        delta["pdserve_worker_prefill_seconds_total"] > 0 and delta["pdserve_worker_decode_seconds_total"] > 0
    )
    assert after["pdserve_worker_num_running_reqs"] == 0 and after["pdserve_worker_num_waiting_reqs"] == 0
    assert after["pdserve_worker_max_total_num_tokens"] == POOL_TOKENS
    assert 0.0 <= after["pdserve_worker_token_usage"] <= 1.0
    assert 0.0 < after["pdserve_worker_cache_hit_rate"] <= 1.0
    assert after["pdserve_worker_retractions_total"] == 0
    for name in ("pdserve_worker_gen_throughput", "pdserve_worker_prefill_throughput"):
        assert after[name] >= 0.0
    with urllib.request.urlopen(worker.http_url + "/health", timeout=5) as resp:
        assert resp.status == 200


# ---------------------------------------------------------------------- 5. SIGTERM


def _children(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == pid]
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.slow
def test_sigterm_aborts_live_request_and_exits_zero(worker_launcher, tiny_model):
    model_dir, vocab = tiny_model
    # no drain: what runs is aborted at once (test_drain.py covers the drain)
    proc = worker_launcher(*_worker_flags(model_dir), "--drain-timeout", "0")
    assert _children(proc.pid) == []
    with WorkerClient(proc.zmq_address) as client:
        client.submit(
            GenerateRequest("live", _prompts(vocab, [9])[0], {"max_new_tokens": 800, "ignore_eos": True})
        )
        stream = client.stream("live", timeout_s=30)
        first = next(stream)
        assert not first.finished
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].finish_reason == {"type": "abort", "message": SHUTDOWN_MESSAGE}
        assert proc.proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 10
    assert not Path(f"/proc/{proc.pid}").exists()


# ---------------------------------------------------------------------- one-shot client, demo


@pytest.mark.slow
def test_one_shot_client_cli_streams_text_and_meta(worker, tiny_model):
    res = zygote.run(
        [sys.executable, "-m", "pdserve.shared.worker.client", "--addr", worker.zmq_address,
         "--tokenizer", tiny_model[0], "--prompt", "Hello", "--chat", "--max-new-tokens", "6"],
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout.strip().splitlines()[-1])["meta_info"]
    assert meta["error"] is None
    assert meta["prompt_tokens"] > len("Hello")  # the chat template wraps the prompt
    assert meta["completion_tokens"] == 6 or meta["finish_reason"]["type"] == "stop"


@pytest.mark.slow
def test_demo_runs_worker_generates_and_stops_it(tiny_model):
    res = subprocess.run(
        [sys.executable, "-m", "pdserve.shared.launch.demo", "--model-path", tiny_model[0],
         "--max-new-tokens", "5", "--", "--dtype", "float32", "--max-total-tokens", "512"],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = json.loads(res.stdout.strip().splitlines()[-1])["meta_info"]
    assert meta["completion_tokens"] == 5 or meta["finish_reason"]["type"] == "stop"
    assert "worker stopped with status 0" in res.stderr


# ---------------------------------------------------------------------- shutdown intake, roles


@pytest.mark.slow
def test_requests_arriving_during_shutdown_are_refused(tiny_model):
    """In-process loop with `stop` already set: queued requests get the shutdown error."""
    import threading

    from pdserve.shared.engine.engine import Engine

    model_dir, _ = tiny_model
    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=256))
    ctx = zmq.Context()
    server = RouterSocket(ctx, "tcp://127.0.0.1:0")
    client = DealerSocket(ctx, server.address)
    try:
        client.send(GenerateRequest("late", [4, 5, 6], GREEDY))
        assert server.poll(5000)
        stop = threading.Event()
        stop.set()
        MixedWorker(engine, server, WorkerMetrics("mixed", model_dir), stop).serve()
        reply = client.recv(timeout_ms=5000)
        assert isinstance(reply, OutputBatch)
        (out,) = reply.outputs
        assert out.rid == "late" and out.finished and out.error == SHUTDOWN_MESSAGE
        assert not engine.has_work()
    finally:
        client.close()
        server.close()
        ctx.term()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--role", "prefill", "--kv-transfer-backend", "carrier-pigeon"], "--kv-transfer-backend"),
        (["--role", "decode", "--num-reserved-decode-tokens", "-1"], "--num-reserved-decode-tokens"),
        (["--role", "decode", "--kv-transfer-timeout", "0"], "--kv-transfer-timeout"),
    ],
)
def test_disaggregated_role_flags_are_checked_before_loading(flags, message):
    """(The roles themselves are tested in test_disagg_workers.py.)"""
    res = zygote.run([sys.executable, "-m", "pdserve.shared.launch.worker_cli", *flags], timeout=60)
    assert res.returncode == 2
    assert message in res.stderr
