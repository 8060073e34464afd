"""Redis membership end to end: worker heartbeats (shared/cluster/membership.py) seen by ClusterView (router).

A real `redis-server` and real `worker --redis-url` processes (tiny random Llama). The router side is
`ClusterView` feeding a `Recorder`: the smallest Membership there is, which only writes down what it
was told (it is the consumer here, not the component under test). Checked:
1. a worker's hash holds its WorkerInfo with a TTL of about TTL_S;
2. a watcher started after a worker sees it when `start()` returns; a worker started later joins
   within one beat of being ready; load fields follow the worker's traffic;
3. two watchers on one Redis see the same workers; a restarted watcher sees everything again;
4. a SIGKILLed worker disappears within TTL_S + 2 beats; a SIGTERMed one at once (its leave event);
5. (in-process registrations, no worker needed) Redis going away keeps the last view and nothing
   is removed; when Redis comes back the heartbeats re-register and the watcher carries on;
   a clean close deletes the key and announces the leave.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from pdserve.router.cluster.cluster_view import ClusterView
from pdserve.shared.cluster.membership import WorkerRegistration
from pdserve.shared.cluster.redis_server import EmbeddedRedis
from pdserve.shared.cluster.worker_info import EVENTS_CHANNEL, HEARTBEAT_S, KEY_PREFIX, TTL_S, WorkerInfo
from pdserve.shared.protocol import GenerateRequest
from pdserve.shared.worker.client import WorkerClient
from tests.helpers.tiny_models import make_tiny_model

SLACK_S = 0.5  # process scheduling on a busy 2-core machine


class Recorder:
    """A Membership that records calls (from the view's event loop thread) for the test thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.workers: dict[str, WorkerInfo] = {}
        self.added_at: dict[str, float] = {}
        self.removed_at: dict[str, float] = {}

    async def add_worker(self, info: WorkerInfo) -> None:
        with self._lock:
            self.workers[info.worker_id] = info
            self.added_at[info.worker_id] = time.monotonic()

    async def remove_worker(self, worker_id: str, expired: bool = False) -> None:
        with self._lock:
            self.workers.pop(worker_id, None)
            self.removed_at[worker_id] = time.monotonic()

    def update_load(self, info: WorkerInfo) -> None:
        with self._lock:
            self.workers[info.worker_id] = info

    def ids(self) -> set[str]:
        with self._lock:
            return set(self.workers)

    def get(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            return self.workers.get(worker_id)


@contextmanager
def watching(redis_url: str, interval_s: float = HEARTBEAT_S) -> Iterator[Recorder]:
    """A ClusterView on its own event loop thread; yields its Recorder once `start()` returned."""
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    view = ClusterView(redis_url, recorder, interval_s=interval_s)
    asyncio.run_coroutine_threadsafe(view.start(), loop).result(10)
    try:
        yield recorder
    finally:
        asyncio.run_coroutine_threadsafe(view.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until condition() held; fails the test past timeout_s."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s:.1f} s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def launch(worker_launcher, redis_url, model_dir):
    def start(*extra: str):
        return worker_launcher(
            "--model-path", model_dir, "--dtype", "float32", "--max-total-tokens", "1024",
            "--max-running-requests", "1", "--redis-url", redis_url, "--log-level", "warning", *extra,
        )  # fmt: skip

    return start


def _worker_id(worker) -> str:
    return "mixed@127.0.0.1:" + worker.zmq_address.rsplit(":", 1)[1]


def test_membership_end_to_end(launch, redis_url):
    first = launch()
    first_id = _worker_id(first)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stored = WorkerInfo.from_redis(client.hgetall(KEY_PREFIX + first_id))
    assert (stored.role, stored.zmq_addr, stored.http_addr) == ("mixed", first.zmq_address, first.http_url)
    assert (stored.max_total_num_tokens, stored.page_size, stored.context_length) == (1024, 16, 1024)
    assert stored.num_total_pages == stored.num_free_pages == 1024 // 16  # idle: every page free
    assert 0 < client.pttl(KEY_PREFIX + first_id) <= TTL_S * 1000

    with watching(redis_url) as view, watching(redis_url) as other_view:
        assert view.ids() == other_view.ids() == {first_id}  # known when start() returns

        second = launch()
        ready_at = time.monotonic()
        second_id = _worker_id(second)
        wait_for(lambda: second_id in view.ids(), HEARTBEAT_S + SLACK_S, "a new worker joining")
        assert view.added_at[second_id] - ready_at <= HEARTBEAT_S + SLACK_S
        wait_for(lambda: second_id in other_view.ids(), HEARTBEAT_S + SLACK_S, "the second view")

        # load follows traffic: with one running slot, six long requests are 1 running + the rest waiting
        with WorkerClient(first.zmq_address) as worker_client:
            params = {"max_new_tokens": 1000, "ignore_eos": True, "temperature": 0.0}
            rids = [f"busy-{i}" for i in range(6)]
            for rid in rids:
                worker_client.submit(GenerateRequest(rid=rid, input_ids=[5, 6, 7], sampling_params=params))
            wait_for(
                lambda: view.get(first_id).num_running == 1 and view.get(first_id).num_waiting >= 1,
                3 * HEARTBEAT_S,
                "load reaching the view",
            )
            for rid in rids:
                worker_client.abort(rid)
                worker_client.collect(rid)
        wait_for(lambda: view.get(first_id).num_running == 0, 3 * HEARTBEAT_S, "load going back to 0")

        second.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: second_id not in view.ids(),
            TTL_S + 2 * HEARTBEAT_S + SLACK_S,
            "a SIGKILLed worker leaving",
        )
        assert view.removed_at[second_id] - killed_at >= TTL_S - HEARTBEAT_S - SLACK_S  # by expiry
        assert first_id in view.ids() and first_id not in view.removed_at

    with watching(redis_url) as restarted:  # a restarted router sees the live workers at once
        assert restarted.ids() == {first_id}
        assert first.stop(signal.SIGTERM) == 0
        wait_for(lambda: not restarted.ids(), SLACK_S, "a clean leave")
    assert client.exists(KEY_PREFIX + first_id) == 0
    client.close()


def _fake_info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role="mixed", zmq_addr="tcp://127.0.0.1:1", started_at=time.time())


def test_redis_outage_keeps_the_view_and_recovers():
    beat = 0.2  # fast beats: registrations and view here are in-process
    server = EmbeddedRedis()
    port = server.port
    registration = WorkerRegistration(server.url, _fake_info("w1"), heartbeat_s=beat, ttl_s=3 * beat)
    registration.start()
    try:
        with watching(server.url, interval_s=beat) as view:
            wait_for(lambda: view.ids() == {"w1"}, 2, "the fake worker joining")
            server.stop()
            time.sleep(4 * beat)  # several failed scans and beats
            assert view.ids() == {"w1"} and not view.removed_at  # the last view is kept
            registration.publish_load(num_running=3, num_waiting=1, num_free_pages=10)

            server = EmbeddedRedis(port=port)  # same address: clients reconnect on their own
            wait_for(lambda: view.get("w1").num_running == 3, 10 * beat, "the view recovering")
            assert view.get("w1").num_free_pages == 10 and not view.removed_at
    finally:
        registration.close()
        server.stop()


def test_registration_close_deletes_key_and_announces_leave(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS_CHANNEL)
    registration = WorkerRegistration(redis_url, _fake_info("w-close"), heartbeat_s=0.2, ttl_s=0.6)
    registration.start()
    try:
        wait_for(lambda: client.exists(KEY_PREFIX + "w-close") == 1, 2, "the first beat")
        registration.close()
        assert client.exists(KEY_PREFIX + "w-close") == 0
        events = []
        deadline = time.monotonic() + 2
        while len(events) < 2 and time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None:
                events.append(json.loads(msg["data"]))
        assert events == [
            {"event": "join", "worker_id": "w-close"},
            {"event": "leave", "worker_id": "w-close"},
        ]
    finally:
        pubsub.close()
        client.close()
