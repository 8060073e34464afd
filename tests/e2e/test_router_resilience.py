"""Faults on the way from the router to its workers: real processes, real signals.

Two tiny-Llama workers (`--max-running-requests 1`, so requests queue inside them) behind one
router (round robin, 1.5 s liveness window). In order:
0. a router whose only worker address has no worker answers 503s that say why;
1. a client that disconnects, streaming or not, aborts its request on the worker (load back to idle);
2. `--request-timeout` (a second router on the same workers) answers 504 and aborts on the worker;
3. a worker frozen with SIGSTOP misses its liveness window: its requests complete on the other
   worker, and it serves again after SIGCONT;
4. a worker killed with SIGKILL while requests are queued on it: every non-streaming request and
   every stream that had not shown a token completes on the other worker with the greedy output;
   a stream that had shown tokens ends with finish_reason abort (status_code 503).
The circuit breaker's transitions are unit-tested (tests/unit/test_policies.py).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

WORKER_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096",
    "--max-running-requests", "1", "--log-level", "warning",
]  # fmt: skip
LONG = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def workers(worker_launcher, tiny_model):
    return [worker_launcher("--model-path", tiny_model, *WORKER_FLAGS) for _ in range(2)]


@pytest.fixture(scope="module")
def router(router_launcher, workers) -> str:
    addrs = [flag for w in workers for flag in ("--worker-addr", w.zmq_address)]
    url = router_launcher(
        *addrs, "--policy", "round_robin", "--worker-liveness-timeout", "1.5", "--load-poll-interval", "0.2"
    ).url
    wait_until(lambda: len(requests.get(url + "/server_info").json()["live_workers"]["mixed"]) == 2)
    return url


@pytest.fixture(scope="module")
def engine(tiny_model):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    return Engine(EngineArgs(model_path=tiny_model, device="cpu", dtype="float32", max_total_tokens=4096))


def wait_until(cond, timeout_s: float = 20.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval_s)


def loads(url: str) -> dict[str, dict]:
    return {row["worker_id"]: row for row in requests.get(url + "/get_load", timeout=10).json()}


def all_idle(url: str) -> bool:
    rows = loads(url).values()
    return all(r["num_reqs"] == 0 and r["router_inflight"] == 0 for r in rows if r["responding"])


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in requests.get(url + "/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------- 0. no worker at all


def test_router_without_a_live_worker_says_why(router_launcher):
    router = router_launcher("--worker-addr", "tcp://127.0.0.1:9", healthy=False)
    for resp, words in (
        (requests.get(router.url + "/health"), "No worker has registered yet"),
        (requests.post(router.url + "/generate", json={"text": "a"}), "No worker"),
        (requests.post(router.url + "/tokenize", json={"prompt": "a"}), "first worker"),
    ):
        assert resp.status_code == 503 and words in resp.json()["message"], resp.text
    info = requests.get(router.url + "/get_model_info").json()
    assert info["model_path"] == "" and info["is_generation"] is True


# ---------------------------------------------------------------------- 1. client disconnect


def test_client_disconnect_aborts_on_the_worker(router):
    body = {"input_ids": [3, 4, 5], "sampling_params": LONG, "stream": True}
    with requests.post(router + "/generate", json=body, stream=True, timeout=30) as resp:
        got = []
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                got.append(line)
            if len(got) == 3:
                break
        assert json.loads(got[-1][6:])["meta_info"]["completion_tokens"] >= 3
    # the connection is closed: the worker stops generating within moments
    wait_until(lambda: all_idle(router), timeout_s=10)

    # not streaming: a raw connection that sends a request and hangs up while it runs
    url = urlparse(router)
    payload = json.dumps({"input_ids": [6, 7], "sampling_params": LONG}).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    wait_until(lambda: any(r["num_running_reqs"] for r in loads(router).values()), timeout_s=10)
    sock.close()
    wait_until(lambda: all_idle(router), timeout_s=10)
    assert metric(router, "pdserve_router_generation_requests_running") == 0


# ---------------------------------------------------------------------- 2. request timeout


def test_request_timeout_answers_504_and_aborts_on_the_worker(router_launcher, workers, router):
    addrs = [flag for w in workers for flag in ("--worker-addr", w.zmq_address)]
    timed = router_launcher(*addrs, "--request-timeout", "0.5").url
    start = time.monotonic()
    resp = requests.post(timed + "/generate", json={"input_ids": [8, 9], "sampling_params": LONG}, timeout=30)
    assert resp.status_code == 504, resp.text
    body = resp.json()
    assert body["code"] == 504 and "timed out after 0.5 s" in body["message"]
    assert time.monotonic() - start < 5
    wait_until(lambda: all_idle(router), timeout_s=10)
    # a short request fits in the limit
    ok = requests.post(timed + "/generate", json={"input_ids": [8], "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200


# ---------------------------------------------------------------------- 3. a frozen worker


def test_requests_to_a_frozen_worker_move_on_after_the_liveness_window(router, workers, engine):
    params = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
    prompts = [[11, i, 12] for i in range(4)]
    expected = [r["output_ids"] for r in engine.generate(prompts, params)]
    frozen = workers[1]
    retries_before = metric(router, "pdserve_router_retries_total")
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        results: list = [None] * len(prompts)

        def run(i: int) -> None:
            body = {"input_ids": prompts[i], "sampling_params": params}
            results[i] = requests.post(router + "/generate", json=body, timeout=60)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200] * len(prompts)
        assert [r.json()["output_ids"] for r in results] == expected
        assert metric(router, "pdserve_router_retries_total") - retries_before >= 1
        assert not loads(router)[frozen.zmq_address]["responding"]
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: loads(router)[frozen.zmq_address]["responding"], timeout_s=10)
    wait_until(lambda: all_idle(router), timeout_s=10)


# ---------------------------------------------------------------------- 4. a killed worker


def test_sigkill_with_queued_requests_completes_them_on_the_other_worker(router, workers, engine):
    # long enough that the victim's queue stays full for seconds: with 40 tokens a fast machine
    # drained it between two load polls and the kill found nothing queued
    params = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    prompts = [[20 + i, 21, 22] for i in range(12)]
    expected = [r["output_ids"] for r in engine.generate(prompts, params)]
    victim = workers[1]
    retries_before = metric(router, "pdserve_router_retries_total")
    results: list = [None] * len(prompts)

    def run(i: int) -> None:
        stream = i % 3 == 0
        body = {"input_ids": prompts[i], "sampling_params": params, "stream": stream}
        resp = requests.post(router + "/generate", json=body, timeout=120)
        if stream:
            chunks = [json.loads(b[6:]) for b in resp.text.split("\n\n") if b.startswith("data: {")]
            results[i] = (resp.status_code, chunks[-1])
        else:
            results[i] = (resp.status_code, resp.json())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    # kill once requests wait in the victim's queue
    wait_until(
        lambda: (loads(router).get(victim.zmq_address) or {}).get("num_waiting_reqs", 0) >= 2, timeout_s=30
    )
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    for t in threads:
        t.join(120)

    aborted = 0
    for i, (status, out) in enumerate(results):
        assert status == 200, (i, out)
        reason = out["meta_info"]["finish_reason"]
        if reason["type"] == "abort":  # a stream that had shown tokens when its worker died
            assert i % 3 == 0 and reason["status_code"] == 503 and victim.zmq_address in reason["message"]
            assert out["output_ids"] == expected[i][: len(out["output_ids"])]
            aborted += 1
        else:
            assert out["output_ids"] == expected[i], i
    assert aborted <= 1  # one request runs at a time on the victim
    assert metric(router, "pdserve_router_retries_total") - retries_before >= 2  # queued ones moved
    assert requests.get(router + "/health").status_code == 200
    info = requests.get(router + "/server_info").json()
    assert victim.zmq_address not in info["live_workers"]["mixed"]
    after = requests.post(router + "/generate", json={"input_ids": prompts[0], "sampling_params": params})
    assert after.status_code == 200 and after.json()["output_ids"] == expected[0]
