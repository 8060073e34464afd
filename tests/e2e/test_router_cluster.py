"""The router over Redis membership, with real processes: a real redis-server, `worker`s that register
themselves, and a `router --redis-url`.

One story, in order: a worker started after the router joins and takes traffic; a worker killed
with SIGKILL disappears and the requests queued on it complete on the other; a router restarted
while the workers run serves again at once.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = [f"request number {i}: tell me a story" for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


def _worker_flags(model_dir: str, redis_url: str) -> list[str]:
    return ["--model-path", model_dir, "--device", "cpu", "--dtype", "float32", "--redis-url", redis_url]


def _generate(url: str, text: str, max_new_tokens: int = 24) -> dict:
    body = {
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
    }
    resp = requests.post(url + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _live_workers(url: str) -> set[str]:
    """ZMQ addresses of the workers the router can serve with (registered, connected, answering)."""
    info = requests.get(url + "/get_server_info", timeout=10).json()
    live = set(info["live_workers"]["mixed"])
    return {w["zmq_addr"] for w in info["workers"] if w["worker_id"] in live}


def _requests_served(worker) -> float:
    for line in requests.get(worker.http_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("pdserve_worker_requests_total "):
            return float(line.split()[1])
    raise AssertionError("the worker's /metrics has no pdserve_worker_requests_total")


def _wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def test_join_kill_and_router_restart(worker_launcher, router_launcher, redis_url, model_dir):
    first = worker_launcher(*_worker_flags(model_dir, redis_url))
    router = router_launcher("--redis-url", redis_url, "--policy", "round_robin")
    expected = {p: _generate(router.url, p)["text"] for p in PROMPTS}

    # a worker started later joins within about one heartbeat and gets its share of the traffic
    second = worker_launcher(*_worker_flags(model_dir, redis_url))
    _wait_for(lambda: len(_live_workers(router.url)) == 2, 3.0, "the second worker to join")
    for p in PROMPTS[:4]:
        assert _generate(router.url, p)["text"] == expected[p]
    assert _requests_served(second) >= 2  # round robin sent it its share

    # SIGKILL one worker while requests are queued on both: every request completes correctly
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = {p: pool.submit(_generate, router.url, p) for p in PROMPTS}
        time.sleep(0.3)
        first.proc.send_signal(signal.SIGKILL)
        results = {p: f.result(timeout=180) for p, f in futures.items()}
    for p, out in results.items():
        assert out["text"] == expected[p], p
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    gone_after = _wait_for(lambda: len(_live_workers(router.url)) == 1, 6.0, "the killed worker to vanish")
    assert gone_after < 6.0

    # a router restarted while the workers run serves again
    assert router.stop() == 0
    restarted = router_launcher("--redis-url", redis_url)
    assert _live_workers(restarted.url) == {second.zmq_address}
    assert _generate(restarted.url, PROMPTS[0])["text"] == expected[PROMPTS[0]]
