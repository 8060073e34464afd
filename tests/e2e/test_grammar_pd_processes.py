"""Constrained decoding across real P/D processes, and a decode worker killed under it.

One prefill worker and two decode workers (`worker --role ...`, zmq KV transfer, tiny random Llama,
CPU, float32) register in a real Redis; a router finds them there. Seeded sampled streams under a
JSON schema (`json_schema` in /generate's sampling params) go through the pair: the prefill worker
samples the first token under the grammar, the decode worker's matcher advances over it and goes on.
Mid-stream, the decode worker holding most streams is killed with SIGKILL: its streams move, with
the tokens they had, to another decode worker, whose fresh matchers advance over those tokens.
Every stream ends at the grammar's end, its text validates against the schema, and its tokens
equal an undisturbed in-process mixed engine's (a seeded row's noise depends only on its seed and
step, so a moved request draws the same tokens). Then the same with n = 2: each unfinished sample
moves on its own, with its tokens and its derived seed.
"""

from __future__ import annotations

import json
import signal
import time

import jsonschema
import pytest
import requests

from tests.helpers.cluster_waits import all_pages_back, live_workers, router_metric, run_in_thread, wait_until

pytestmark = pytest.mark.slow

COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "8192", "--log-level", "warning"]
KV = ["--kv-transfer-backend", "zmq", "--kv-transfer-timeout", "10"]
SCHEMA = {
    "type": "object",
    "properties": {
        "log": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["log"],
}
# Prompts longer than the decode side's --local-prefill-threshold (64), so the prefill worker
# samples each first token, and a moved stream goes through it again.
PROMPTS = [[ord(c) for c in f"Entry {i}: "] * (9 + i) for i in range(12)]


def _params(i: int) -> dict:
    return {
        "temperature": 1.0,
        "sampling_seed": 100 + i,
        "max_new_tokens": 300,
        "json_schema": json.dumps(SCHEMA),
    }


@pytest.fixture(scope="module")
def cluster(worker_launcher, router_launcher, tiny_llama_dir, redis_url):
    flags = ["--model-path", tiny_llama_dir, *COMMON, "--redis-url", redis_url, *KV]
    prefill = worker_launcher(*flags, "--role", "prefill", "--chunked-prefill-size", "16")
    decoders = [worker_launcher(*flags, "--role", "decode") for _ in range(3)]  # each test kills one
    url = router_launcher("--redis-url", redis_url, "--load-poll-interval", "0.2").url
    wait_until(
        lambda: len(live_workers(url, "prefill")) == 1 and len(live_workers(url, "decode")) == 3,
        30.0,
        "three workers",
    )
    return url, prefill, decoders


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> list[dict]:
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    engine = Engine(
        EngineArgs(model_path=tiny_llama_dir, device="cpu", dtype="float32", chunked_prefill_size=16)
    )
    return engine.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))])


def _last_events(url: str, i: int, n: int = 1) -> dict[int, dict]:
    """Streams /generate; each sample's last event, by index."""
    body = {"input_ids": PROMPTS[i], "sampling_params": {**_params(i), "n": n}, "stream": True}
    with requests.post(url + "/generate", json=body, stream=True, timeout=180) as resp:
        assert resp.status_code == 200, resp.text
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: {")]
    return {e.get("index", 0): e for e in events}


def _kill_the_busiest_decoder(url: str, decoders, streams) -> None:
    """Once every live decode worker streams, SIGKILL the one with most requests in flight."""
    by_id = {w: d for d in decoders if d.proc.poll() is None for w in [_decoder_id(url, d)]}

    def generated() -> dict[str, int]:
        rows = requests.get(url + "/get_load", timeout=10).json()
        return {r["worker_id"]: r["generated_tokens"] for r in rows if r["worker_id"] in by_id}

    before = generated()
    threads = streams()
    wait_until(
        lambda: all(n - before[w] > 24 for w, n in generated().items()), 90.0, "the decode workers streaming"
    )
    rows = requests.get(url + "/get_load", timeout=10).json()
    victim = max(by_id, key=lambda w: next(r["router_inflight"] for r in rows if r["worker_id"] == w))
    killed_at = time.monotonic()
    by_id[victim].proc.send_signal(signal.SIGKILL)
    wait_until(lambda: victim not in live_workers(url, "decode"), 5.0, "the router to see the worker gone")
    assert time.monotonic() - killed_at <= 5.0
    for thread in threads:
        thread.join(180)


def _assert_valid_and_equal(got, want: dict, what: str) -> None:
    assert not isinstance(got, BaseException), f"{what}: {got!r}"
    assert got["meta_info"]["finish_reason"]["type"] == "stop", (what, got["meta_info"])
    assert got["output_ids"] == want["output_ids"], what
    jsonschema.validate(json.loads(bytes(got["output_ids"][:-1]).decode("utf-8")), SCHEMA)


def _decoder_id(url: str, worker) -> str:
    port = worker.zmq_address.rsplit(":", 1)[1]
    return next(w for w in live_workers(url, "decode") if w.endswith(":" + port))


def test_constrained_streams_survive_a_decode_worker_kill(cluster, reference):
    url, _, decoders = cluster
    results: dict[int, object] = {}
    moves = router_metric(url, "pdserve_router_migrations_total")
    _kill_the_busiest_decoder(
        url,
        decoders,
        lambda: [run_in_thread(lambda i=i: _last_events(url, i)[0], results, i) for i in range(12)],
    )
    for i, want in enumerate(reference):
        _assert_valid_and_equal(results[i], want, f"stream {i}")
    assert router_metric(url, "pdserve_router_migrations_total") > moves
    wait_until(lambda: all_pages_back(url), 20.0, "the survivors idle with every page free or cached")


def test_the_samples_of_n_2_streams_move_one_by_one(cluster, tiny_llama_dir):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    url, _, decoders = cluster
    engine = Engine(
        EngineArgs(model_path=tiny_llama_dir, device="cpu", dtype="float32", chunked_prefill_size=16)
    )
    want = engine.generate(PROMPTS[:6], [{**_params(i), "n": 2} for i in range(6)])  # samples in prompt order
    results: dict[int, object] = {}
    moves = router_metric(url, "pdserve_router_migrations_total")
    _kill_the_busiest_decoder(
        url,
        decoders,
        lambda: [run_in_thread(lambda i=i: _last_events(url, i, n=2), results, i) for i in range(6)],
    )
    for i in range(6):
        got = results[i]
        assert not isinstance(got, BaseException), f"prompt {i}: {got!r}"
        for index in (0, 1):
            _assert_valid_and_equal(got[index], want[2 * i + index], f"prompt {i} sample {index}")
    assert router_metric(url, "pdserve_router_migrations_total") > moves
    wait_until(lambda: all_pages_back(url), 20.0, "the survivors idle with every page free or cached")
