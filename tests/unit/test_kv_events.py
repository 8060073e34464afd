"""KVEventPublisher (worker side) and PrefixIndex (router side) over a real redis-server, in process.

The publishers here stand in for workers' radix caches (their listener calls are made by hand) and
membership keys are written directly; the worker processes end to end are tests/e2e/test_prefix_index.py.
Checked: the exact stream entries and snapshot; an index started before or after the events holds
the same, exact state (late: from a stale snapshot plus the stream's tail); removed and cleared
events; a worker whose membership key is gone drops out; a restarted worker starts empty; another
page size is not indexed; a Redis restart (everything lost) is repaired by the publisher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from pdserve.router.cluster.precise_prefix_index import PrefixIndex
from pdserve.shared.cluster.kv_event_types import STREAM_KEY, KVEvent, KVSnapshot, snapshot_key, stream_id_key
from pdserve.shared.cluster.kv_events import KVEventPublisher
from pdserve.shared.cluster.page_hash import page_hashes
from pdserve.shared.cluster.redis_server import EmbeddedRedis
from pdserve.shared.cluster.worker_info import KEY_PREFIX, WorkerInfo

PS = 2  # page size


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as srv:
        yield srv


@pytest.fixture
def url(server) -> Iterator[str]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    yield server.url
    client.close()


def join(url: str, worker_id: str, role: str = "prefill") -> None:
    client = redis.Redis.from_url(url)
    client.hset(KEY_PREFIX + worker_id, mapping=WorkerInfo(worker_id, role, "tcp://127.0.0.1:1").to_redis())
    client.close()


def leave(url: str, worker_id: str) -> None:
    client = redis.Redis.from_url(url)
    client.delete(KEY_PREFIX + worker_id)
    client.close()


def publisher(url: str, worker_id: str, **kwargs) -> KVEventPublisher:
    pub = KVEventPublisher(url, worker_id, PS, **kwargs)
    pub.start()
    return pub


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_stream_entries_and_snapshot_are_exact(url):
    a = page_hashes([1, 2, 3, 4], PS)
    pub = KVEventPublisher(url, "w1", PS, flush_interval_s=60.0)  # only flush() publishes here
    pub.on_stored(a)  # before start: folded, published after the opening "cleared" as the whole cache
    pub.start()
    try:
        pub.on_removed([a[1]])
        pub.on_stored([a[1]])
        pub.on_cleared()
        pub.on_stored([a[0]])
        pub.on_stored([a[1]])
        pub.flush()
        client = redis.Redis.from_url(url)
        entries = client.xrange(STREAM_KEY)
        events = [KVEvent.from_fields(fields) for _, fields in entries]
        assert [(e.worker_id, e.kind, e.hashes) for e in events] == [
            ("w1", "cleared", []),
            ("w1", "stored", sorted(a)),
            ("w1", "cleared", []),  # what came before the clear in its batch was dropped
            ("w1", "stored", a),  # one run of stored events, one entry
        ]
        snap = KVSnapshot.from_fields(client.hgetall(snapshot_key("w1")))
        assert (snap.stream_id, snap.page_size, snap.hashes) == (entries[-1][0].decode(), PS, sorted(a))
        assert 0 < client.pttl(snapshot_key("w1")) <= 30_000
        assert pub.held == set(a)
        client.close()
    finally:
        pub.close()
    client = redis.Redis.from_url(url)
    assert KVEvent.from_fields(client.xrevrange(STREAM_KEY, count=1)[0][1]).kind == "cleared"
    assert not client.exists(snapshot_key("w1"))
    client.close()


def test_index_follows_and_a_late_index_catches_up(url):
    async def scenario() -> None:
        p1 = [1, 2, 3, 4, 5, 6]
        p2 = [1, 2, 3, 4, 7, 8, 9, 9]
        join(url, "w1")
        join(url, "w2")
        join(url, "d1", role="decode")  # never indexed
        # slow snapshots: the late index must replay the stream's tail after a stale snapshot
        w1 = publisher(url, "w1", flush_interval_s=0.01, snapshot_interval_s=60.0)
        w2 = publisher(url, "w2", flush_interval_s=0.01, snapshot_interval_s=60.0)
        early = PrefixIndex(url, PS, interval_s=0.1)
        await early.start()
        try:
            assert early.workers == {"w1", "w2"} and early.match_tokens(p1) == {}
            w1.on_stored(page_hashes(p1, PS))
            w2.on_stored(page_hashes(p2, PS))
            wait_until(lambda: len(w1.held) == 3 and len(w2.held) == 4)
            await asyncio.sleep(0.2)  # the publisher threads append after folding
            await early.refresh()
            assert early.match_tokens(p1 + [0]) == {"w1": 6, "w2": 4}
            assert early.match_tokens(p2) == {"w1": 4, "w2": 8}
            assert early.match_tokens([1, 2, 9]) == {"w1": 2, "w2": 2}
            assert early.match_tokens([5, 6, 1, 2]) == {}

            client = redis.Redis.from_url(url)
            snap = KVSnapshot.from_fields(client.hgetall(snapshot_key("w1")))
            last = client.xrevrange(STREAM_KEY, count=1)[0][0]
            assert snap.hashes == [] and stream_id_key(snap.stream_id) < stream_id_key(last)  # stale
            client.close()
            late = PrefixIndex(url, PS, interval_s=0.1)
            await late.start()
            try:
                for prompt in (p1, p2, [1, 2, 3]):
                    assert late.match_tokens(prompt) == early.match_tokens(prompt)
                assert (late.num_pages("w1"), late.num_pages("w2")) == (3, 4)

                w2.on_removed(page_hashes(p2, PS)[1:])  # w2 evicts all but its first page
                w1.on_cleared()
                await asyncio.sleep(0.2)
                for index in (early, late):
                    await index.refresh()
                    assert index.match_tokens(p2) == {"w2": 2}
                    assert index.num_pages("w1") == 0 and index.num_pages("w2") == 1

                leave(url, "w2")  # membership gone (expiry or clean leave): out of the index
                for index in (early, late):
                    await index.refresh()
                    assert index.workers == {"w1"} and index.match_tokens(p2) == {}
            finally:
                await late.stop()
        finally:
            await early.stop()
            w1.close()
            w2.close()

    asyncio.run(scenario())


def test_restart_mismatch_and_redis_restart(server):
    async def scenario() -> EmbeddedRedis:
        srv = server
        url = srv.url
        redis.Redis.from_url(url).flushall()
        p = [1, 2, 3, 4]
        join(url, "w1")
        join(url, "odd")
        w1 = publisher(url, "w1")
        odd = KVEventPublisher(url, "odd", PS + 1)
        odd.start()
        odd.on_stored(page_hashes(p[:3], PS + 1))
        odd.flush()
        index = PrefixIndex(url, PS, interval_s=0.1)
        await index.start()
        try:
            assert index.workers == {"w1"}  # another page size is not indexed
            w1.on_stored(page_hashes(p, PS))
            w1.flush()
            await index.refresh()
            assert index.match_tokens(p) == {"w1": 4}

            w1.close()  # a restart under the same id: the new run's cache starts empty
            w1 = publisher(url, "w1")
            await index.refresh()
            assert index.match_tokens(p) == {} and index.workers == {"w1"}
            w1.on_stored(page_hashes(p, PS))
            w1.flush()
            await index.refresh()
            assert index.match_tokens(p) == {"w1": 4}

            # Redis restarts and loses everything; the publisher republishes its whole cache
            port = srv.port
            srv.stop()
            w1.on_stored(page_hashes(p + [5, 6], PS)[2:])
            assert not w1.flush()
            assert await index.refresh() is False
            assert index.match_tokens(p + [5, 6]) == {"w1": 4}  # the last index is kept
            srv = EmbeddedRedis(port=port)
            join(url, "w1")  # the heartbeat would rewrite it
            assert w1.flush()
            await index.refresh()
            assert index.match_tokens(p + [5, 6]) == {"w1": 6}
            late = PrefixIndex(url, PS)
            await late.start()
            assert late.match_tokens(p + [5, 6]) == {"w1": 6}
            await late.stop()
        finally:
            await index.stop()
            w1.close()
            odd.close()
        return srv

    restarted = asyncio.run(scenario())
    if restarted is not server:
        restarted.stop()
