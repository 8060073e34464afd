"""The router's precise prefix index: which worker's radix cache holds which pages, from their KV events.

    index = PrefixIndex(redis_url, page_size)
    await index.start()                      # catches up from snapshots and the stream, then follows it
    index.match_tokens(input_ids)            # {worker_id: cached prompt tokens (whole pages)}
    await index.stop()

Workers publish what their radix caches store and evict (shared/cluster/kv_events.py; the schema is in
shared/cluster/kv_event_types.py). Rules:
- The index holds, per page chain hash, the set of workers holding that page. `match_tokens` walks
  the prompt's chain (shared/cluster/page_hash.py) while at least one worker holds every page so far and
  gives each worker the tokens of the leading pages it holds: O(pages) per request, hashing stops
  at the first page no worker holds. Workers holding nothing of the prompt are absent.
- A worker is indexed ("synced") once it is live (its membership key `pdserve:worker:<id>` exists,
  role prefill or mixed) and its snapshot was read: the index takes the snapshot, then the worker's
  entries after the snapshot's stream id. Entries of workers not synced are skipped; the sync
  replays them from the stream. So a router that starts late, a worker that joins, and a worker
  that comes back after a Redis outage all end up exact. A live worker without a snapshot yet, or
  with another page size, is not indexed (retried every check; a page-size mismatch is logged once).
- Every `interval_s` the membership keys are checked: a synced worker whose key is gone (clean
  leave, or TTL expiry after missed beats) is dropped with all its pages, so it is never chosen
  for a cache hit it cannot give. A "cleared" entry (flush, restart) empties a worker.
- Redis unreachable: logged once per outage; the last index is kept (a stale hit costs only a
  recompute) and reading resumes from the same stream position.
- Limit: the stream is capped (STREAM_MAXLEN entries). A sync whose snapshot is older than the
  stream's first entry is retried at the next check (the worker refreshes its snapshot every few
  seconds). One event loop owns the index: `match_tokens` is plain, lock-free Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdserve.shared.cluster.kv_event_types import (
    STREAM_KEY,
    KVEvent,
    KVSnapshot,
    snapshot_key,
    stream_id_key,
)
from pdserve.shared.cluster.page_hash import iter_page_hashes
from pdserve.shared.cluster.worker_info import HEARTBEAT_S, KEY_PREFIX, TTL_S

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0

INDEXED_ROLES = ("prefill", "mixed")
_READ_COUNT = 1000  # entries per XREAD: bounds the time one fold holds the event loop
_SCAN_COUNT = 1000


class PrefixIndex:
    def __init__(self, redis_url: str, page_size: int, interval_s: float = HEARTBEAT_S):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.redis_url = redis_url
        self.page_size = page_size
        self.interval_s = interval_s
        # the blocking XREAD waits up to interval_s: the socket must outlast it
        self._client = aioredis.Redis.from_url(
            redis_url, socket_timeout=interval_s + TTL_S, socket_connect_timeout=TTL_S
        )
        self._holders: dict[int, set[str]] = {}  # page hash -> workers holding it
        self._pages: dict[str, set[int]] = {}  # synced worker -> its pages (the same facts, per worker)
        self._floor: dict[str, tuple[int, int]] = {}  # synced worker -> its entries up to here are folded
        self._last_id = "0-0"  # the stream position read up to
        self._started = False
        self._lock = asyncio.Lock()  # one fold at a time: refresh() may race the follow task
        self._task: asyncio.Task | None = None
        self._outage = False
        self._warned_page_size: set[str] = set()
        self._last_check = float("-inf")
        self._stopping = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Catches up (every live worker's snapshot and entries) before returning, then follows the
        stream in the background. Redis unreachable is logged, not raised: the follow task retries."""
        await self.refresh()
        self._task = asyncio.create_task(self._follow(), name="prefix-index")

    async def stop(self) -> None:
        """Ends the follow task and closes the client, each within STOP_TIMEOUT_S: a Redis call
        that ignores the cancellation must not hang the router's shutdown."""
        self._stopping = True  # a cancel swallowed inside a Redis read still ends the loop
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
            self._task = None
        with contextlib.suppress(asyncio.TimeoutError, RedisError, OSError):
            await asyncio.wait_for(self._client.aclose(), STOP_TIMEOUT_S)

    # ------------------------------------------------------------------ queries

    def match_tokens(self, input_ids: Sequence[int]) -> dict[str, int]:
        """Per worker, how many leading tokens of `input_ids` (whole pages) its cache holds; workers
        holding none are absent."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        tokens = 0
        for page_hash in iter_page_hashes(input_ids, self.page_size):
            holders = self._holders.get(page_hash)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            tokens += self.page_size
            for worker_id in alive:
                out[worker_id] = tokens
        return out

    @property
    def workers(self) -> set[str]:
        """The synced workers (indexed, possibly holding nothing)."""
        return set(self._pages)

    def num_pages(self, worker_id: str) -> int:
        """Pages the index believes `worker_id` holds (0 when it is not indexed)."""
        return len(self._pages.get(worker_id, ()))

    # ------------------------------------------------------------------ folding

    async def refresh(self) -> bool:
        """Reads every entry written so far and checks membership now; False when Redis could not be
        read (the index is then unchanged). The follow task does the same on its own."""
        return await self._fold(block_ms=None, check=True)

    async def _follow(self) -> None:
        while not self._stopping:
            check = time.monotonic() - self._last_check >= self.interval_s
            try:
                block_ms = max(1, int(self.interval_s * 1000))  # BLOCK 0 would wait forever
                ok = await self._fold(block_ms=block_ms, check=check)
            except Exception:  # a bug in one fold must not end the index
                logger.exception("prefix index fold failed")
                ok = False
            if not ok:
                await asyncio.sleep(self.interval_s)

    async def _fold(self, block_ms: int | None, check: bool) -> bool:
        try:
            async with self._lock:
                if not self._started:
                    self._last_id = await self._stream_end()
                    self._started = True
                    check = True
                await self._read(block_ms)
                if check:
                    await self._check_membership()
                    self._last_check = time.monotonic()
        except (RedisError, OSError) as exc:
            if not self._outage:
                logger.warning(
                    "prefix index cannot read %s (keeping the last index): %s", self.redis_url, exc
                )
                self._outage = True
            return False
        if self._outage:
            logger.info("prefix index reading %s again", self.redis_url)
            self._outage = False
        return True

    async def _stream_end(self) -> str:
        last = await self._client.xrevrange(STREAM_KEY, count=1)
        return last[0][0].decode() if last else "0-0"

    async def _read(self, block_ms: int | None) -> None:
        """Folds entries after _last_id: once blocking up to block_ms, then without waiting until
        the stream is drained."""
        while True:
            reply = await self._client.xread({STREAM_KEY: self._last_id}, count=_READ_COUNT, block=block_ms)
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self._apply_entry(entry_id, fields)
                self._last_id = entry_id.decode()
            if len(entries) < _READ_COUNT:
                return
            block_ms = None

    def _apply_entry(self, entry_id: bytes, fields: dict) -> None:
        try:
            event = KVEvent.from_fields(fields)
        except (ValueError, KeyError) as exc:  # a foreign or newer writer: skip, do not crash
            logger.warning("skipping malformed KV event %s: %s", entry_id, exc)
            return
        floor = self._floor.get(event.worker_id)
        if floor is not None and stream_id_key(entry_id) > floor:
            self._apply(event)

    def _apply(self, event: KVEvent) -> None:
        worker = event.worker_id
        pages = self._pages[worker]
        if event.kind == "stored":
            for h in event.hashes:
                pages.add(h)
                self._holders.setdefault(h, set()).add(worker)
        elif event.kind == "removed":
            for h in event.hashes:
                pages.discard(h)
                self._unhold(h, worker)
        else:  # cleared
            for h in pages:
                self._unhold(h, worker)
            pages.clear()

    def _unhold(self, page_hash: int, worker: str) -> None:
        holders = self._holders.get(page_hash)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self._holders[page_hash]

    def _drop(self, worker: str) -> None:
        for h in self._pages.pop(worker, ()):
            self._unhold(h, worker)
        self._floor.pop(worker, None)

    # ------------------------------------------------------------------ membership and sync

    async def _check_membership(self) -> None:
        keys = [k async for k in self._client.scan_iter(match=KEY_PREFIX + "*", count=_SCAN_COUNT)]
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "role")
            roles = await pipe.execute()
        live: set[str] = set()
        for key, role in zip(keys, roles):
            try:
                if role is not None and json.loads(role) in INDEXED_ROLES:
                    live.add(key.decode()[len(KEY_PREFIX) :])
            except ValueError:
                continue
        for worker in [w for w in self._pages if w not in live]:
            logger.info("prefix index: worker %s left; dropping its %d pages", worker, self.num_pages(worker))
            self._drop(worker)
        for worker in sorted(live - set(self._pages)):
            await self._sync(worker)

    async def _sync(self, worker: str) -> None:
        """Indexes a live worker from its snapshot and its entries after it, up to _last_id."""
        raw = await self._client.hgetall(snapshot_key(worker))
        if not raw:
            return  # not publishing yet: retried at the next check
        try:
            snap = KVSnapshot.from_fields(raw)
        except (ValueError, KeyError) as exc:
            logger.warning("prefix index: malformed snapshot of %s: %s", worker, exc)
            return
        if snap.page_size != self.page_size:
            if worker not in self._warned_page_size:
                logger.warning(
                    "prefix index: worker %s has page size %d, the router %d: not indexed",
                    worker,
                    snap.page_size,
                    self.page_size,
                )
                self._warned_page_size.add(worker)
            return
        floor = stream_id_key(snap.stream_id)
        tail: list = []
        if floor < stream_id_key(self._last_id):
            first = await self._client.xrange(STREAM_KEY, count=1)
            if first and floor != (0, 0) and stream_id_key(first[0][0]) > floor:
                logger.info("prefix index: snapshot of %s predates the stream; retrying later", worker)
                return
            tail = await self._client.xrange(STREAM_KEY, min=f"({snap.stream_id}", max=self._last_id)
        self._pages[worker] = set()
        self._floor[worker] = floor
        self._apply(KVEvent(worker, "stored", snap.hashes))
        for entry_id, fields in tail:
            self._apply_entry(entry_id, fields)
        logger.info("prefix index: worker %s indexed with %d pages", worker, self.num_pages(worker))
