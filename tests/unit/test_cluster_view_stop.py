"""The router's Redis watchers stop promptly (router/cluster/cluster_view.py, precise_prefix_index.py).

On Python 3.11 a task cancelled while its `asyncio.wait_for`'s inner wait completes (a join event
waking the membership scan in the same loop turn) loses the cancellation; a `while True` watch
then ran on and `stop()` waited for it forever, hanging the router's shutdown. Against a real
`redis-server`: the wake and the stop land together, many times over, and every stop returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from pdserve.router.cluster.cluster_view import ClusterView
from pdserve.router.cluster.precise_prefix_index import PrefixIndex
from pdserve.shared.cluster.redis_server import EmbeddedRedis

HANG_S = 30.0  # every cycle of a test together; a stop waited forever before the fix


class NoMembers:
    async def add_worker(self, info) -> None:
        pass

    async def remove_worker(self, worker_id: str, expired: bool = False) -> None:
        pass

    def update_load(self, info) -> None:
        pass


def run(coro):
    """Runs `coro` on a loop in a thread of its own and waits HANG_S at most: a watch that loses its
    cancellation (and so a stop that waits for it) fails the test instead of hanging it."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(HANG_S)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"a stop() still waited after {HANG_S:.0f} s")
    finally:
        loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


def test_a_stop_that_meets_a_wake_returns_at_once(redis_url):
    async def cycles() -> float:
        worst = 0.0
        for i in range(40):
            view = ClusterView(redis_url, NoMembers(), interval_s=0.2)
            await view.start()
            await asyncio.sleep(0.01 * (i % 5))  # the scan waits on its wake event
            view._wake.set()  # a join event: the scan's wait completes on the next turn ...
            started = time.monotonic()
            await view.stop()  # ... the turn its cancellation arrives in
            worst = max(worst, time.monotonic() - started)
        return worst

    worst = run(cycles())
    assert worst < 1.0, f"a stop took {worst:.1f} s (ClusterView.STOP_TIMEOUT_S {ClusterView.STOP_TIMEOUT_S})"


def test_the_prefix_index_stops_while_it_follows(redis_url):
    async def cycles() -> float:
        worst = 0.0
        for i in range(10):
            index = PrefixIndex(redis_url, page_size=16, interval_s=0.2)
            await index.start()
            await asyncio.sleep(0.02 * (i % 3))  # inside a blocking read of the event stream
            started = time.monotonic()
            await index.stop()
            worst = max(worst, time.monotonic() - started)
        return worst

    assert run(cycles()) < 1.0
