"""Faults on the way from the router to its workers: real processes, real signals.

Two tiny-Llama workers (`--max-running-requests 1`, so requests queue inside them) behind one
router (round robin, 1.5 s heartbeat timeout). In order:
0. a router whose only worker address has no worker answers 503s that say why;
1. a client that disconnects, streaming or not, aborts its request on the worker (load back to idle);
2. `--request-timeout` (a second router on the same workers) answers 504 and aborts on the worker;
3. a worker frozen with SIGSTOP misses its heartbeats: its requests complete on the other
   worker, and it serves again after SIGCONT;
4. the circuit breaker in the live path (a third router, threshold 2, cooldown 5 s): requests a
   worker refuses as the client's fault (a rid it runs for the other router) never open its
   circuit; requests that fail on a frozen worker do: once it answers again the router still sends
   it nothing until the cooldown, then one probe request closes the circuit;
5. a worker killed with SIGKILL while requests are queued on it: every request completes on the
   other worker with the greedy output, also a stream that had shown tokens (it moves, with the
   tokens it had, and goes on).
The circuit breaker's transitions are also unit-tested (tests/unit/test_policies.py).
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


def test_requests_to_a_frozen_worker_move_on_after_missed_heartbeats(router, workers, engine):
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


# ---------------------------------------------------------------------- 4. the circuit breaker

BREAKER_COOLDOWN_S = 5.0


@pytest.fixture(scope="module")
def breaker_router(router_launcher, workers) -> str:
    addrs = [flag for w in workers for flag in ("--worker-addr", w.zmq_address)]
    url = router_launcher(
        *addrs, "--policy", "round_robin", "--worker-liveness-timeout", "1.0", "--load-poll-interval", "0.2",
        "--breaker-failure-threshold", "2", "--breaker-cooldown", str(BREAKER_COOLDOWN_S),
    ).url  # fmt: skip
    wait_until(lambda: len(requests.get(url + "/server_info").json()["live_workers"]["mixed"]) == 2)
    return url


def circuits(url: str) -> dict[str, str]:
    return {w["worker_id"]: w["circuit"] for w in requests.get(url + "/get_server_info").json()["workers"]}


def engine_requests(worker) -> float:
    """Generate requests the worker's engine accepted, from the worker's own /metrics (published
    every 0.25 s or so: a count may lag its requests by that much)."""
    for line in requests.get(worker.http_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("pdserve_worker_requests_total "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no pdserve_worker_requests_total on the worker")


def settled_engine_requests(workers) -> list[float]:
    """engine_requests of each idle worker, once two reads 0.5 s apart agree."""
    counts = [engine_requests(w) for w in workers]
    while True:
        time.sleep(0.5)
        again = [engine_requests(w) for w in workers]
        if again == counts:
            return counts
        counts = again


def test_requests_a_worker_refuses_do_not_open_its_circuit(router, breaker_router, workers):
    # a rid the worker runs for the other router: the worker refuses it again (the client reused a
    # rid), which reaches dispatch as the worker's 400, not as a failure of the worker
    result: dict = {}

    def hold_the_rid() -> None:
        body = {"input_ids": [3, 4], "sampling_params": LONG, "rid": "taken"}
        result["resp"] = requests.post(router + "/generate", json=body, timeout=60)

    thread = threading.Thread(target=hold_the_rid)
    thread.start()
    wait_until(lambda: any(r["num_running_reqs"] for r in loads(router).values()), timeout_s=10)
    statuses = []
    for _ in range(6):  # round robin: three to each worker, three refusals in a row on the busy one
        body = {"input_ids": [5], "sampling_params": {"max_new_tokens": 1}, "rid": "taken"}
        resp = requests.post(breaker_router + "/generate", json=body, timeout=30)
        statuses.append(resp.status_code)
        if resp.status_code == 400:
            assert resp.json()["message"] == (
                "Duplicate request id 'taken': a request with this rid is still running."
            )  # the worker's words (the router's own check says "is running.")
    assert sorted(statuses) == [200] * 3 + [400] * 3, statuses
    assert circuits(breaker_router) == {w.zmq_address: "closed" for w in workers}
    assert metric(breaker_router, "pdserve_router_worker_failures_total") == 0
    assert requests.post(router + "/abort_request", json={"rid": "taken"}).status_code == 200
    thread.join(30)
    assert result["resp"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    wait_until(lambda: all_idle(router), timeout_s=10)


def test_a_failing_worker_is_skipped_until_the_cooldown_then_probed_back(breaker_router, workers, engine):
    params = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
    prompts = [[30, i, 31] for i in range(6)]
    expected = [r["output_ids"] for r in engine.generate(prompts, params)]
    healthy, failing = workers
    failures = f'pdserve_router_worker_failures_total{{worker="{failing.zmq_address}"}}'
    failures_before = metric(breaker_router, failures)
    healthy_before, accepted_before = settled_engine_requests([healthy, failing])

    def generate(i: int) -> list[int]:
        resp = requests.post(
            breaker_router + "/generate",
            json={"input_ids": prompts[i], "sampling_params": params},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["output_ids"]

    # six requests at once while the worker is frozen: those sent to it fail when its heartbeats
    # go unanswered (two or more failures: the threshold) and complete on the other worker
    started = time.monotonic()  # the circuit opens after this, so it stays open until started + cooldown
    failing.proc.send_signal(signal.SIGSTOP)
    try:
        results: list = [None] * len(prompts)
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, generate(i)))
            for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == expected
        failed = metric(breaker_router, failures) - failures_before
        assert failed >= 2
        assert circuits(breaker_router)[failing.zmq_address] == "open"
        assert (
            metric(breaker_router, f'pdserve_router_worker_circuit_state{{worker="{failing.zmq_address}"}}')
            == 0
        )
    finally:
        failing.proc.send_signal(signal.SIGCONT)
    # it answers again; of the requests it was sent while frozen it takes in those that reached it
    # before its connection was closed (they are aborted: they moved on), the others were lost with
    # the connection
    wait_until(lambda: loads(breaker_router)[failing.zmq_address]["responding"], timeout_s=10)
    (taken_in,) = settled_engine_requests([failing])
    assert accepted_before <= taken_in <= accepted_before + failed

    # open: every request goes to the other worker until the cooldown has passed (it ran all six
    # above, its own and the retried ones)
    assert [generate(i) for i in range(4)] == expected[:4]
    assert circuits(breaker_router)[failing.zmq_address] == "open"
    assert time.monotonic() - started < BREAKER_COOLDOWN_S, "too slow to see the open circuit"
    wait_until(lambda: engine_requests(healthy) == healthy_before + 6 + 4, timeout_s=10)
    assert engine_requests(failing) == taken_in

    # after the cooldown one probe goes to it (round robin: one of the next two), and succeeds
    wait_until(
        lambda: circuits(breaker_router)[failing.zmq_address] == "half_open", timeout_s=BREAKER_COOLDOWN_S + 5
    )
    assert [generate(4), generate(5)] == expected[4:]
    wait_until(lambda: engine_requests(failing) == taken_in + 1, timeout_s=10)
    assert circuits(breaker_router) == {w.zmq_address: "closed" for w in workers}
    assert (
        metric(breaker_router, f'pdserve_router_worker_circuit_state{{worker="{failing.zmq_address}"}}') == 2
    )
    wait_until(lambda: all_idle(breaker_router), timeout_s=10)


# ---------------------------------------------------------------------- 5. a killed worker


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

    for i, (status, out) in enumerate(results):
        assert status == 200, (i, out)
        assert out["meta_info"]["finish_reason"]["type"] == "length", (i, out)
        assert out["output_ids"] == expected[i], i
    assert metric(router, "pdserve_router_retries_total") - retries_before >= 2  # queued ones moved
    assert requests.get(router + "/health").status_code == 200
    info = requests.get(router + "/server_info").json()
    assert victim.zmq_address not in info["live_workers"]["mixed"]
    after = requests.post(router + "/generate", json={"input_ids": prompts[0], "sampling_params": params})
    assert after.status_code == 200 and after.json()["output_ids"] == expected[0]
