"""Constrained decoding across real P/D processes, and a decode worker killed under it.

One prefill worker and two decode workers (`worker --role ...`, zmq KV transfer, tiny random Llama,
CPU, float32) register in a real Redis; a router finds them there. Seeded sampled streams under a
JSON schema (`json_schema` in /generate's sampling params) go through the pair: the prefill worker
samples the first token under the grammar, the decode worker's matcher advances over it and goes on.
Mid-stream, the decode worker holding most streams is killed with SIGKILL: its streams move, with
the tokens they had, through prefill to the other decode worker, whose fresh matchers advance over
those tokens. Every stream ends at the grammar's end, its text validates against the schema, and
its tokens equal an undisturbed in-process mixed engine's (a seeded row's noise depends only on its
seed and step, so a moved request draws the same tokens).
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
    decoders = [worker_launcher(*flags, "--role", "decode") for _ in range(2)]
    url = router_launcher("--redis-url", redis_url, "--load-poll-interval", "0.2").url
    wait_until(
        lambda: len(live_workers(url, "prefill")) == 1 and len(live_workers(url, "decode")) == 2,
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


def _last_event(url: str, i: int) -> dict:
    body = {"input_ids": PROMPTS[i], "sampling_params": _params(i), "stream": True}
    with requests.post(url + "/generate", json=body, stream=True, timeout=180) as resp:
        assert resp.status_code == 200, resp.text
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: {")][-1]


def _decoder_id(url: str, worker) -> str:
    port = worker.zmq_address.rsplit(":", 1)[1]
    return next(w for w in live_workers(url, "decode") if w.endswith(":" + port))


def test_constrained_streams_survive_a_decode_worker_kill(cluster, reference):
    url, _, decoders = cluster
    by_id = {_decoder_id(url, d): d for d in decoders}

    def generated() -> dict[str, int]:
        rows = requests.get(url + "/get_load", timeout=10).json()
        return {r["worker_id"]: r["generated_tokens"] for r in rows if r["worker_id"] in by_id}

    before = generated()
    results: dict[int, object] = {}
    threads = [run_in_thread(lambda i=i: _last_event(url, i), results, i) for i in range(len(PROMPTS))]
    wait_until(
        lambda: all(n - before[w] > 24 for w, n in generated().items()), 90.0, "both decode workers streaming"
    )
    rows = requests.get(url + "/get_load", timeout=10).json()
    victim = max(by_id, key=lambda w: next(r["router_inflight"] for r in rows if r["worker_id"] == w))
    killed_at = time.monotonic()
    by_id[victim].proc.send_signal(signal.SIGKILL)
    wait_until(lambda: victim not in live_workers(url, "decode"), 5.0, "the router to see the worker gone")
    assert time.monotonic() - killed_at <= 5.0
    for thread in threads:
        thread.join(180)
    for i, want in enumerate(reference):
        got = results[i]
        assert not isinstance(got, BaseException), f"stream {i}: {got!r}"
        assert got["meta_info"]["finish_reason"]["type"] == "stop", (i, got["meta_info"])
        assert got["output_ids"] == want["output_ids"], f"stream {i}"
        jsonschema.validate(json.loads(bytes(got["output_ids"][:-1]).decode("utf-8")), SCHEMA)
    assert router_metric(url, "pdserve_router_migrations_total") >= 1
    wait_until(lambda: all_pages_back(url), 20.0, "the survivors idle with every page free or cached")
