"""A worker's KV events to Redis: what its radix cache stores, evicts and clears, for the routers' index.

    publisher = KVEventPublisher(redis_url, worker_id, page_size)
    engine = Engine(args, kv_listener=publisher)   # the radix cache calls on_stored/on_removed/on_cleared
    publisher.start()                              # before the membership heartbeat starts
    ...
    publisher.close()                              # after the membership key is deleted

Rules (the schema is in kv_event_types.py; the reader is router/cluster/precise_prefix_index.py):
- The listener calls come from the engine loop and only append to a list under a lock: Redis is
  touched by the publisher's own thread (and by start/flush/close), so it can never stall the engine.
- Every `flush_interval_s` the thread takes the queued events, folds them into its mirror of the
  cache (the set of hashes held), and appends them to the stream in order, a run of same-kind events
  per entry (what precedes a "cleared" in a batch is dropped: the reader would erase it anyway).
- The snapshot (the mirror plus the id of the last entry folded into it) is rewritten when a batch
  held a "cleared", when it changed and `snapshot_interval_s` passed, and on `flush()`; otherwise its
  TTL is refreshed. A worker that dies stops refreshing it, and its membership key expires first.
- start() announces a fresh cache ("cleared", then the snapshot) before returning, so an index
  never mixes in pages of an earlier run with the same worker id. A failure there is logged and
  retried by the thread.
- Redis unreachable: logged once per outage; events keep folding into the mirror, and when Redis
  answers again the thread appends "cleared" plus one "stored" of the whole mirror, then the
  snapshot, so readers end exact without the lost entries.
- close() stops the thread, appends "cleared" and deletes the snapshot (best effort).
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from pdserve.shared.cluster.kv_event_types import (
    SNAPSHOT_TTL_S,
    STREAM_KEY,
    STREAM_MAXLEN,
    KVEvent,
    KVSnapshot,
    snapshot_key,
)
from pdserve.shared.cluster.worker_info import TTL_S

logger = logging.getLogger(__name__)


class KVEventPublisher:
    """A RadixListener (shared/engine/radix_node.py) that ships its events to Redis."""

    def __init__(
        self,
        redis_url: str,
        worker_id: str,
        page_size: int,
        flush_interval_s: float = 0.05,
        snapshot_interval_s: float = 2.0,
        stream_maxlen: int = STREAM_MAXLEN,
    ):
        self.redis_url = redis_url
        self.worker_id = worker_id
        self.page_size = page_size
        self.flush_interval_s = flush_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self.stream_maxlen = stream_maxlen
        self._lock = threading.Lock()  # guards _pending between the engine loop and the publisher
        self._pending: list[tuple[str, list[int]]] = []
        self._io_lock = threading.Lock()  # one publish at a time: the thread, flush() and close()
        self._held: set[int] = set()  # the mirror: every page the cache holds, as of the last fold
        self._last_id = "0-0"  # the id of the last entry folded into _held
        self._dirty = False  # _held changed since the last snapshot
        self._last_snapshot = float("-inf")
        self._need_reset = True  # the stream does not reflect _held (not started, or an outage)
        self._outage_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ RadixListener (engine loop)

    def on_stored(self, hashes: list[int]) -> None:
        with self._lock:
            self._pending.append(("stored", hashes))

    def on_removed(self, hashes: list[int]) -> None:
        with self._lock:
            self._pending.append(("removed", hashes))

    def on_cleared(self) -> None:
        with self._lock:
            self._pending.append(("cleared", []))

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.flush()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def flush(self) -> bool:
        """Publishes everything queued so far and the snapshot now; False when Redis failed."""
        client = self._client()
        try:
            return self._publish(client, force_snapshot=True)
        finally:
            client.close()

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        client = self._client()
        try:
            with self._io_lock, client.pipeline(transaction=False) as pipe:
                self._xadd(pipe, KVEvent(self.worker_id, "cleared", []))
                pipe.delete(snapshot_key(self.worker_id))
                pipe.execute()
        except redis.RedisError as exc:
            logger.warning("could not withdraw the KV events of %s: %s", self.worker_id, exc)
        finally:
            client.close()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def held(self) -> set[int]:
        """The mirror (tests, debugging): the pages published as held, as of the last fold."""
        with self._io_lock:
            return set(self._held)

    # ------------------------------------------------------------------ publishing

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=TTL_S, socket_connect_timeout=TTL_S)

    def _run(self) -> None:
        client = self._client()
        try:
            while not self._stop.wait(self.flush_interval_s):
                self._publish(client, force_snapshot=False)
        finally:
            client.close()

    def _publish(self, client: redis.Redis, force_snapshot: bool) -> bool:
        with self._lock:
            pending, self._pending = self._pending, []
        with self._io_lock:
            events = self._fold(pending)
            try:
                if self._need_reset:
                    self._reset(client)
                elif events:
                    with client.pipeline(transaction=False) as pipe:
                        for event in events:
                            self._xadd(pipe, event)
                        self._last_id = _text(pipe.execute()[-1])
                cleared = any(e.kind == "cleared" for e in events)
                self._write_snapshot(client, force_snapshot or cleared)
            except redis.RedisError as exc:
                if not self._outage_logged:
                    logger.warning("KV events to %s failed (retrying): %s", self.redis_url, exc)
                    self._outage_logged = True
                self._need_reset = True
                return False
        if self._outage_logged:
            logger.info("KV events to %s flowing again", self.redis_url)
            self._outage_logged = False
        return True

    def _fold(self, pending: list[tuple[str, list[int]]]) -> list[KVEvent]:
        """Applies pending to the mirror; returns the entries to append (runs of one kind merged)."""
        events: list[KVEvent] = []
        for kind, hashes in pending:
            if kind == "stored":
                self._held.update(hashes)
            elif kind == "removed":
                self._held.difference_update(hashes)
            else:
                self._held.clear()
                events.clear()  # everything before a clear is erased by it
            if events and events[-1].kind == kind:
                events[-1].hashes.extend(hashes)
            else:
                events.append(KVEvent(self.worker_id, kind, list(hashes)))
        self._dirty = self._dirty or bool(events)
        return events

    def _reset(self, client: redis.Redis) -> None:
        """Makes the stream say exactly the mirror: "cleared", then all of it as "stored"."""
        with client.pipeline(transaction=False) as pipe:
            self._xadd(pipe, KVEvent(self.worker_id, "cleared", []))
            if self._held:
                self._xadd(pipe, KVEvent(self.worker_id, "stored", sorted(self._held)))
            self._last_id = _text(pipe.execute()[-1])
        self._dirty = True
        self._need_reset = False
        self._write_snapshot(client, force=True)

    def _write_snapshot(self, client: redis.Redis, force: bool) -> None:
        now = time.monotonic()
        due = now - self._last_snapshot >= self.snapshot_interval_s
        key = snapshot_key(self.worker_id)
        ttl_ms = int(SNAPSHOT_TTL_S * 1000)
        # an expired key (a long stall) is rewritten even when nothing changed
        if force or (due and (self._dirty or not client.pexpire(key, ttl_ms))):
            snap = KVSnapshot(self._last_id, self.page_size, sorted(self._held))
            with client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=snap.to_fields())
                pipe.pexpire(key, ttl_ms)
                pipe.execute()
            self._dirty = False
        if force or due:
            self._last_snapshot = now

    def _xadd(self, pipe, event: KVEvent) -> None:
        pipe.xadd(STREAM_KEY, event.to_fields(), maxlen=self.stream_maxlen, approximate=True)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
