"""The router's admission queue (router/serving/admission.py) in front of a real worker.

One tiny-Llama worker with `--max-running-requests 1`: the cluster runs one request at a time, so
the router's queue holds the rest. In order:
1. `--max-queued-requests 2`: of 8 concurrent long requests, 1 runs, 2 wait and 5 get 429 at once
   (Retry-After, the OpenAI error shape); the 3 others complete with the greedy output, nothing is
   5xx; /metrics shows the queue gauge, the queue-time histogram and the 429 count; a queued
   request whose client leaves frees its place;
2. the `openai` client gets `openai.RateLimitError` from a full queue;
3. `--enable-priority-scheduling` (a second router on the same worker): a request of higher
   priority sent last evicts the newest of the lower ones from the full queue (429) and runs
   before the other.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
PROMPT = [3, 4, 5, 6]


def params(max_new_tokens: int) -> dict:
    return {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}


@pytest.fixture(scope="module")
def worker(worker_launcher, tmp_path_factory):
    model = make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama")))
    return worker_launcher("--model-path", str(model), *WORKER_FLAGS)


@pytest.fixture(scope="module")
def router(router_launcher, worker) -> str:
    return router_launcher("--worker-addr", worker.zmq_address, "--max-queued-requests", "2").url


def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of the samples of `name` (with `labels`, e.g. 'reason="queue_full"', when given)."""
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith((name + " ", name + "{")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def generate(url: str, max_new_tokens: int, **extra) -> requests.Response:
    body = {"input_ids": PROMPT, "sampling_params": params(max_new_tokens), **extra}
    return requests.post(url + "/generate", json=body, timeout=300)


def assert_rate_limited(resp: requests.Response) -> None:
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    body = resp.json()
    assert body["object"] == "error" and body["type"] == "RateLimitError" and body["code"] == 429
    assert body["message"]


def test_full_queue_answers_429_and_the_rest_completes(router):
    reference = generate(router, 300).json()["output_ids"]
    assert metric(router, "pdserve_router_queue_time_seconds_count") == 1  # admitted at once

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: generate(router, 300), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 3 + [429] * 5, [r.text[:200] for r in responses]
    for resp in responses:
        if resp.status_code == 429:
            assert_rate_limited(resp)
        else:
            assert resp.json()["output_ids"] == reference
    assert metric(router, "pdserve_router_queue_rejections_total", 'reason="queue_full"') == 5
    assert metric(router, "pdserve_router_requests_total", 'code="429"') == 5
    assert metric(router, "pdserve_router_queue_time_seconds_count") == 4
    assert metric(router, "pdserve_router_queue_time_seconds_sum") > 0  # two of them waited
    assert metric(router, "pdserve_router_generation_requests_queued") == 0
    assert metric(router, "pdserve_router_generation_requests_running") == 0


def test_queued_client_that_leaves_frees_its_place(router):
    blocker = threading.Thread(target=generate, args=(router, 400))
    blocker.start()
    wait_until(lambda: metric(router, "pdserve_router_generation_requests_running") == 1)
    # a raw connection: no response headers come while the request waits, so no HTTP client returns
    url = urlparse(router)
    payload = json.dumps({"input_ids": PROMPT, "sampling_params": params(50), "stream": True}).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    wait_until(lambda: metric(router, "pdserve_router_generation_requests_queued") == 1)
    sock.close()
    # the connection closed while queued: the router's handler was cancelled, the place freed
    wait_until(lambda: metric(router, "pdserve_router_generation_requests_queued") == 0)
    assert generate(router, 5, rid="after-leaving").status_code == 200  # queued behind the blocker
    blocker.join()
    assert metric(router, "pdserve_router_generation_requests_running") == 0


def test_openai_client_gets_rate_limit_error(router):
    openai = pytest.importorskip("openai")
    background = [threading.Thread(target=generate, args=(router, 400)) for _ in range(3)]
    for thread in background:
        thread.start()
        time.sleep(0.05)  # in order: one runs, two wait
    wait_until(lambda: metric(router, "pdserve_router_generation_requests_queued") == 2)
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert err.value.status_code == 429
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert "queue is full" in err.value.message
    for thread in background:
        thread.join()


def test_priority_scheduling_orders_and_evicts(router_launcher, worker):
    url = router_launcher(
        "--worker-addr", worker.zmq_address, "--max-queued-requests", "2", "--enable-priority-scheduling"
    ).url
    finished: list[str] = []
    results: dict[str, requests.Response] = {}

    def send(name: str, priority: int, max_new_tokens: int) -> None:
        results[name] = generate(url, max_new_tokens, priority=priority)
        finished.append(name)

    threads = []
    for name, priority, max_new_tokens, queued in (
        ("blocker", 0, 1000, 0),  # long enough to outlast the queue checks on a loaded box
        ("low-1", 1, 50, 1),
        ("low-2", 1, 50, 2),
        ("high", 10, 50, 2),  # the queue is full: the newest low one is evicted for it
    ):
        threads.append(threading.Thread(target=send, args=(name, priority, max_new_tokens)))
        threads[-1].start()
        if name == "blocker":
            wait_until(lambda: metric(url, "pdserve_router_generation_requests_running") == 1)
        wait_until(lambda q=queued: metric(url, "pdserve_router_generation_requests_queued") == q)
    for thread in threads:
        thread.join()
    assert_rate_limited(results["low-2"])
    assert "higher priority" in results["low-2"].json()["message"]
    assert finished == ["low-2", "blocker", "high", "low-1"], finished
    assert all(results[n].status_code == 200 for n in ("blocker", "high", "low-1"))
    assert metric(url, "pdserve_router_queue_rejections_total", 'reason="evicted"') == 1
