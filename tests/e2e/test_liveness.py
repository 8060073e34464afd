"""Alive and busy are different facts: real workers, a real router, real signals.

Two tiny-Llama workers, A and B. A runs with the test-only fault `PDSERVE_TEST_SLOW_STEP`: the step
that first holds a request whose rid starts with "slow-" sleeps 20 s, with its loop blocked as a
long prefill, a weights update or a graph capture would block it. Router R_A knows only A, router
R_AB both (round robin), both with the default heartbeat timeout (3 s). In order:
1. while A sleeps inside a step (20 s, far beyond the heartbeat timeout): A stays live in both
   routers, nothing is retried or counted as a failure, the request in the slow step and every
   request queued behind it on A complete with the greedy output, and B serves its share at once;
2. B frozen with SIGSTOP while it streams a request: the router sees B gone within 5 s (missed
   heartbeats), the stream moves to A and ends with the greedy output of an undisturbed run; after
   SIGCONT, B is live again and does not go on with the request that moved (the router aborts it
   once the connection is back), and both workers end idle with every page free or cached.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time

import pytest
import requests

from tests.helpers.cluster_waits import all_pages_back, live_workers, router_metric, run_in_thread, wait_until

pytestmark = pytest.mark.slow

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
SLEEP_S = 20.0
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
LONG = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> str:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def engine(model_dir):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    return Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=4096))


@pytest.fixture(scope="module")
def workers(worker_launcher, model_dir):
    slow = worker_launcher(
        "--model-path", model_dir, *FLAGS, env={"PDSERVE_TEST_SLOW_STEP": f"{SLEEP_S:g}:slow-"}
    )
    return slow, worker_launcher("--model-path", model_dir, *FLAGS)


@pytest.fixture(scope="module")
def routers(router_launcher, workers) -> tuple[str, str]:
    a, b = workers
    r_a = router_launcher("--worker-addr", a.zmq_address, "--load-poll-interval", "0.2").url
    r_ab = router_launcher(
        "--worker-addr", a.zmq_address, "--worker-addr", b.zmq_address, "--policy", "round_robin",
        "--load-poll-interval", "0.2",
    ).url  # fmt: skip
    wait_until(
        lambda: len(live_workers(r_ab)) == 2 and len(live_workers(r_a)) == 1,
        what="both routers to see their workers",
    )
    return r_a, r_ab


def _post(url: str, body: dict, results: dict, key) -> threading.Thread:
    """POSTs /generate in a thread; results[key]: (status, body, seconds taken), or the exception."""

    def call() -> tuple[int, dict, float]:
        started = time.monotonic()
        resp = requests.post(url + "/generate", json=body, timeout=120)
        return resp.status_code, resp.json(), time.monotonic() - started

    return run_in_thread(call, results, key)


def test_a_worker_asleep_in_a_step_is_busy_not_dead(routers, workers, engine):
    r_a, r_ab = routers
    prompts = [[40 + i, 41, 42, 43] for i in range(6)]
    want = [r["output_ids"] for r in engine.generate(prompts, GREEDY)]
    results: dict = {}
    started = time.monotonic()
    threads = [_post(r_a, {"input_ids": prompts[0], "sampling_params": GREEDY, "rid": "slow-1"}, results, 0)]
    time.sleep(2.0)  # A takes it in and falls asleep in its first step
    threads.append(_post(r_a, {"input_ids": prompts[1], "sampling_params": GREEDY}, results, 1))
    threads += [
        _post(r_ab, {"input_ids": p, "sampling_params": GREEDY}, results, i)
        for i, p in enumerate(prompts[2:], 2)
    ]
    while time.monotonic() - started < SLEEP_S - 2:  # A stays live all along
        assert live_workers(r_a) == [workers[0].zmq_address] and len(live_workers(r_ab)) == 2
        time.sleep(1.0)
    for thread in threads:
        thread.join(60)
    for i, w in enumerate(want):
        assert not isinstance(results[i], BaseException), (i, results[i])
        status, body, _ = results[i]
        assert status == 200 and body["output_ids"] == w, (i, body)
    assert results[0][2] >= SLEEP_S - 1  # it really waited for the step
    assert sorted(r[2] for i, r in results.items() if i >= 2)[:2] < [5.0, 5.0]  # B's share, at once
    for url in (r_a, r_ab):
        assert router_metric(url, "pdserve_router_retries_total") == 0
        assert router_metric(url, "pdserve_router_worker_failures_total") == 0


def test_a_frozen_worker_is_dead_within_seconds_and_its_stream_moves(routers, workers, engine):
    _, r_ab = routers
    _, b = workers
    prompt = [50, 51, 52, 53, 54]
    (want,) = [r["output_ids"] for r in engine.generate([prompt], LONG)]
    # round robin: of two streams, one is on B
    streams: dict = {}
    arrivals: dict[int, list[float]] = {0: [], 1: []}

    def stream(key: int) -> None:
        body = {"input_ids": prompt, "sampling_params": LONG, "stream": True}
        with requests.post(r_ab + "/generate", json=body, stream=True, timeout=120) as resp:
            events = []
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    arrivals[key].append(time.monotonic())
                    events.append(json.loads(line[6:]))
        streams[key] = events

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in (0, 1)]
    for thread in threads:
        thread.start()
    wait_until(lambda: all(len(v) >= 5 for v in arrivals.values()), 20.0, "both streams under way")
    frozen_at = time.monotonic()
    b.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: b.zmq_address not in live_workers(r_ab), 5.0, "the router to see B gone")
        detected_s = time.monotonic() - frozen_at
        for thread in threads:
            thread.join(120)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert detected_s <= 5.0
    for key in (0, 1):
        assert streams[key][-1]["output_ids"] == want, key
        assert streams[key][-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert streams[key][-1]["meta_info"]["completion_tokens"] == LONG["max_new_tokens"]
    gaps = [max(later - earlier for earlier, later in itertools.pairwise(t)) for t in arrivals.values()]
    assert max(gaps) <= 6.0, gaps  # the moved stream waited about the heartbeat timeout, not more
    assert router_metric(r_ab, "pdserve_router_migrations_total") >= 1
    wait_until(lambda: b.zmq_address in live_workers(r_ab), 10.0, "B live again after SIGCONT")
    wait_until(lambda: all_pages_back(r_ab), 10.0, "both workers idle with every page free or cached")
