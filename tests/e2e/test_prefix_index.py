"""The precise prefix index end to end: real `worker --redis-url` processes (tiny random Llama, CPU)
publish their radix caches' KV events; `PrefixIndex` (router/cluster/precise_prefix_index.py) folds them.

1. Two mixed workers serve prompts with shared prefixes: the index reports, per worker, the whole
   pages of each prompt it holds, and a repeat sent to a worker gets exactly the index's count as
   `cached_tokens`; an index started late (stale snapshots plus the stream's tail) agrees; a flush
   empties a worker in the index; a SIGKILLed worker drops out once its membership key expires.
2. Disaggregated, through a router with `--prefill-policy cache_aware` (two prefill workers, one
   decode worker, Redis): repeats of a prefix go to the prefill worker holding it, asserted from
   `cached_tokens` in the responses.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pdserve.router.cluster.precise_prefix_index import PrefixIndex
from pdserve.shared.cluster.redis_server import EmbeddedRedis
from pdserve.shared.cluster.worker_info import HEARTBEAT_S, TTL_S
from pdserve.shared.protocol import GenerateRequest
from pdserve.shared.worker.client import WorkerClient
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

PAGE = 16  # the workers' default page size
COMMON = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "2048", "--log-level", "warning"]
ONE_TOKEN = {"temperature": 0.0, "max_new_tokens": 1}  # KV computed for the prompt only


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class IndexThread:
    """A PrefixIndex on its own event loop thread; the test thread asks it through the loop."""

    def __init__(self, redis_url: str, interval_s: float = 0.2):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.index = PrefixIndex(redis_url, PAGE, interval_s=interval_s)
        self._run(self.index.start())

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self._run(call())

    def match(self, ids: list[int]) -> dict[str, int]:
        return self._call(lambda: self.index.match_tokens(ids))

    def workers(self) -> set[str]:
        return self._call(lambda: self.index.workers)

    def close(self) -> None:
        self._run(self.index.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


def _id(worker, role: str) -> str:
    return f"{role}@127.0.0.1:" + worker.zmq_address.rsplit(":", 1)[1]


def _send(worker, rid: str, ids: list[int]) -> int:
    """Runs one request on the worker; its cached_tokens."""
    with WorkerClient(worker.zmq_address) as client:
        client.submit(GenerateRequest(rid=rid, input_ids=ids, sampling_params=dict(ONE_TOKEN)))
        (out,) = client.collect(rid)
    assert out.finished and not out.error, out
    return out.cached_tokens


def test_index_of_mixed_workers(worker_launcher, redis_url, model_dir):
    w1 = worker_launcher("--model-path", model_dir, "--redis-url", redis_url, *COMMON)
    w2 = worker_launcher("--model-path", model_dir, "--redis-url", redis_url, *COMMON)
    id1, id2 = _id(w1, "mixed"), _id(w2, "mixed")
    prefix = _prompt(48, seed=0)  # three pages
    a = prefix + _prompt(10, seed=1)  # 58 tokens: 3 whole pages cached
    b = prefix[:32] + _prompt(30, seed=2)  # 62 tokens: shares 2 pages with a, 3 whole pages cached

    index = IndexThread(redis_url)
    try:
        wait_until(lambda: index.workers() == {id1, id2}, 5, "both workers indexed")
        assert index.match(a) == {}  # warm-up left nothing cached
        assert _send(w1, "a1", a) == 0
        wait_until(lambda: index.match(a) == {id1: 48}, 5, "w1's pages of a")
        assert _send(w2, "b2", b) == 0
        wait_until(lambda: index.match(b) == {id1: 32, id2: 48}, 5, "w2's pages of b")
        assert index.match(a) == {id1: 48, id2: 32}
        assert index.match(prefix[:31]) == {id1: 16, id2: 16}

        # the index's count is what the worker then reuses
        claimed = index.match(a)[id2]
        assert _send(w2, "a2", a) == claimed == 32
        wait_until(lambda: index.match(a) == {id1: 48, id2: 48}, 5, "w2 holding all of a")

        late = IndexThread(redis_url)  # snapshots were taken at start; the rest is the stream's tail
        try:
            for ids in (a, b, prefix, prefix[:20]):
                assert late.match(ids) == index.match(ids)
        finally:
            late.close()

        with WorkerClient(w1.zmq_address) as client:
            assert client.flush_cache().success
        wait_until(lambda: index.match(a) == {id2: 48}, 5, "w1 emptied by its flush")
        assert _send(w1, "a3", a) == 0

        w2.stop(signal.SIGKILL)
        wait_until(lambda: id2 not in index.workers(), TTL_S + 3 * HEARTBEAT_S, "the killed worker leaving")
        assert index.match(b) == {id1: 32}
    finally:
        index.close()


def _generate(url: str, ids: list[int]) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": 2}}
    resp = requests.post(url + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]


def _live(url: str) -> dict[str, list[str]]:
    return requests.get(url + "/get_server_info", timeout=10).json()["live_workers"]


@pytest.fixture
def own_redis_url() -> Iterator[str]:
    """A Redis of its own: the mixed worker of the test before must not join these routers' pools."""
    with EmbeddedRedis() as server:
        yield server.url


def test_cache_aware_routing_follows_the_index(worker_launcher, router_launcher, own_redis_url, model_dir):
    """Prefixes warmed through router B are served warm through router A, which never saw them: A's
    own (approximate) tree knows nothing, only the workers' KV events tell it where they are."""
    redis_url = own_redis_url
    flags = ["--model-path", model_dir, "--redis-url", redis_url, *COMMON]
    kv = ["--kv-transfer-backend", "zmq", "--kv-transfer-timeout", "10"]
    p1 = worker_launcher(*flags, "--role", "prefill", *kv)
    p2 = worker_launcher(*flags, "--role", "prefill", *kv)
    worker_launcher(*flags, "--role", "decode", *kv)
    ids = {_id(p1, "prefill"), _id(p2, "prefill")}
    router_flags = ["--redis-url", redis_url, "--prefill-policy", "cache_aware", "--log-level", "warning"]
    warmer = router_launcher(*router_flags).url
    wait_until(lambda: len(_live(warmer)["prefill"]) == 2 and _live(warmer)["decode"], 20, "warmer's workers")

    prefixes = [_prompt(96, seed=10 + i) for i in range(4)]  # six pages each
    index = IndexThread(redis_url)
    try:
        for i, prefix in enumerate(prefixes):  # 116 tokens: longer than the local prefill threshold
            assert _generate(warmer, prefix + _prompt(20, seed=100 + i))["cached_tokens"] == 0
        wait_until(lambda: all(index.match(p) for p in prefixes), 10, "the warm prefixes indexed")
        holders = [index.match(p) for p in prefixes]
        assert all(len(h) == 1 and set(h.values()) == {96} and set(h) <= ids for h in holders), holders
        assert {next(iter(h)) for h in holders} == ids  # least load spread them over both workers

        router = router_launcher(*router_flags).url
        wait_until(lambda: len(_live(router)["prefill"]) == 2 and _live(router)["decode"], 20, "workers")
        time.sleep(2.0)  # the router's index starts once a prefill worker reported its page size
        hits = [
            _generate(router, prefix + _prompt(30, seed=200 + i))["cached_tokens"]
            for i, prefix in reversed(list(enumerate(prefixes)))
        ]
        assert hits == [96] * len(prefixes)  # every repeat went where its prefix was
        assert [index.match(p) for p in prefixes] == holders  # and nowhere else
    finally:
        index.close()
