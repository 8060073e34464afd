"""Graceful drain: SIGTERM on a worker lets what it runs finish, then it leaves; real processes, a
real Redis, a router that learns its workers from Redis.

1. A worker (`--drain-timeout 60`) streaming a request gets SIGTERM: it leaves the cluster at once
   (the router lists it no more, new requests go to the other worker), the stream ends normally
   with the greedy output, and the worker exits 0 once it is done.
2. A worker with `--drain-timeout 0` streaming a long request gets SIGTERM: it leaves and at once
   aborts the request; the router moves the stream to the other worker, and it ends with the
   greedy output of an undisturbed run.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest
import requests

from tests.helpers.cluster_waits import live_workers, router_metric, wait_until

pytestmark = pytest.mark.slow

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
LONG = {"temperature": 0.0, "max_new_tokens": 600, "ignore_eos": True}
PROMPT = [60, 61, 62, 63]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> str:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def want(model_dir) -> list[int]:
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=4096))
    return engine.generate([PROMPT], LONG)[0]["output_ids"]


def _stream(url: str, out: dict) -> threading.Thread:
    def run() -> None:
        body = {"input_ids": PROMPT, "sampling_params": LONG, "stream": True}
        with requests.post(url + "/generate", json=body, stream=True, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    out.setdefault("events", []).append(json.loads(line[6:]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _streaming_worker(url: str, workers: dict) -> tuple[str, object]:
    rows = requests.get(url + "/get_load", timeout=10).json()
    (row,) = [r for r in rows if r["router_inflight"]]
    return row["worker_id"], workers[row["worker_id"]]


@pytest.mark.parametrize("drain_timeout", ["60", "0"])
def test_sigterm_drains_then_leaves(
    worker_launcher, router_launcher, redis_url, model_dir, want, drain_timeout
):
    flags = ["--model-path", model_dir, *FLAGS, "--redis-url", redis_url, "--drain-timeout", drain_timeout]
    started = [worker_launcher(*flags), worker_launcher(*flags)]
    url = router_launcher("--redis-url", redis_url, "--load-poll-interval", "0.2").url
    wait_until(lambda: len(live_workers(url)) == 2, what="both workers live")
    ids = {
        w: next(i for i in live_workers(url) if i.endswith(":" + w.zmq_address.rsplit(":", 1)[1]))
        for w in started
    }
    workers = {worker_id: w for w, worker_id in ids.items()}
    out: dict = {}
    thread = _stream(url, out)
    # ten tokens out (an event may hold several when the router catches up)
    wait_until(
        lambda: len(out.get("events", [{}])[-1].get("output_ids", [])) >= 10, what="the stream under way"
    )
    victim_id, victim = _streaming_worker(url, workers)
    victim.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: victim_id not in live_workers(url), 5.0, "the draining worker to leave the router's list"
    )
    short = requests.post(
        url + "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4}}
    )
    assert short.status_code == 200, short.text  # served by the other worker
    thread.join(120)
    last = out["events"][-1]
    assert last["meta_info"]["finish_reason"]["type"] == "length", last["meta_info"]
    assert last["output_ids"] == want
    assert victim.proc.wait(30) == 0
    retries = router_metric(url, "pdserve_router_retries_total")
    if drain_timeout == "60":
        assert retries == 0  # it finished where it ran
    else:
        assert retries >= 1  # aborted by the drain timeout, moved to the other worker
    for w in started:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            w.proc.wait(30)
