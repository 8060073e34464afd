"""Redis killed and restarted under load: serving goes on with the last known membership, and the
workers register again by themselves once Redis is back; real processes, a real `redis-server`.

Two mixed tiny-Llama workers and a router learn of each other through Redis. Four clients send
greedy requests in a loop the whole time. Redis is SIGKILLed, stays away for 4 s (longer than the
membership keys' TTL), and comes back empty on the same port. Checked: every request succeeds with
the greedy output (no 5xx), the router lists both workers as live at every moment (a key lost with
Redis is no death: the pool keeps a worker whose connection answers heartbeats), the workers'
keys are back within a few seconds, and a request after the outage still succeeds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis
import requests

from pdserve.shared.cluster.redis_server import EmbeddedRedis
from tests.helpers.cluster_waits import live_workers, wait_until

pytestmark = pytest.mark.slow

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir) -> str:
    return tiny_llama_dir


def worker_keys(url: str) -> int:
    try:
        return len(redis.Redis.from_url(url).keys("pdserve:worker:*"))
    except redis.RedisError:
        return 0


def test_serving_goes_on_through_a_redis_outage(worker_launcher, router_launcher, model_dir):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    prompts = [[70 + i, 71, 72] for i in range(4)]
    engine = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", max_total_tokens=4096))
    want = [r["output_ids"] for r in engine.generate(prompts, GREEDY)]
    with EmbeddedRedis() as server:
        for _ in range(2):
            worker_launcher("--model-path", model_dir, *FLAGS, "--redis-url", server.url)
        url = router_launcher("--redis-url", server.url, "--load-poll-interval", "0.2").url
        wait_until(lambda: len(live_workers(url)) == 2, what="both workers live")
        stop = threading.Event()
        failures: list[str] = []
        counts = {"ok": 0, "min_live": 2}

        def client(i: int) -> None:
            while not stop.is_set():
                resp = requests.post(
                    url + "/generate", json={"input_ids": prompts[i], "sampling_params": GREEDY}, timeout=30
                )
                if resp.status_code != 200 or resp.json()["output_ids"] != want[i]:
                    failures.append(f"{resp.status_code}: {resp.text[:200]}")
                counts["ok"] += 1

        def watch() -> None:
            while not stop.is_set():
                counts["min_live"] = min(counts["min_live"], len(live_workers(url)))
                time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        threads.append(threading.Thread(target=watch, daemon=True))
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            os.kill(server.pid, signal.SIGKILL)
            wait_until(lambda: server.poll() is not None, 5.0, "redis-server to die")
            served_before = counts["ok"]
            time.sleep(OUTAGE_S)
            assert counts["ok"] > served_before  # requests went on while Redis was away
            server.restart()
            wait_until(lambda: worker_keys(server.url) == 2, 10.0, "the workers to register again")
            time.sleep(2.0)  # a scan of the router sees them again
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not failures, failures[:3]
        assert counts["min_live"] == 2
        resp = requests.post(url + "/generate", json={"input_ids": prompts[0], "sampling_params": GREEDY})
        assert resp.status_code == 200 and resp.json()["output_ids"] == want[0]
