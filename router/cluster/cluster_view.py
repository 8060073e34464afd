"""The router's view of the cluster: Redis membership keys turned into `Membership` calls.

    view = ClusterView(redis_url, membership)   # membership: router/cluster/worker_pool.py, or any Membership
    await view.start()                            # one scan, then a background watch
    ...
    await view.stop()

Rules:
- `start()` scans `pdserve:worker:*` once and calls `add_worker` for every live worker before it
  returns, so a router that starts after its workers can serve at once. Redis unreachable at start
  is logged, not raised: the watch keeps retrying and the router serves nothing until it connects.
- The watch rescans every `HEARTBEAT_S`, and at once when a join or leave arrives on
  `EVENTS_CHANNEL`. Each scan reconciles: an unknown id → `add_worker`; a known id whose address or
  start time changed (a restarted worker) → `add_worker` again (it replaces); a known id →
  `update_load`; a known id whose key is gone (TTL expiry after missed beats, or a Redis that
  restarted empty) → `remove_worker(id, expired=True)`. A "leave" event (a worker that drains and
  exits) → `remove_worker(id)` at once. So a new worker joins within one beat; the membership
  decides what an expiry means (the router's pool keeps a worker whose connection answers
  heartbeats: it registers again by itself once Redis is back).
- Redis unreachable during the watch: logged once per outage, the last view is kept (workers stay
  routable; the pool's connections notice dead ones on their own), and the scan is retried every
  beat.
- The view only reads Redis: any number of routers can watch one Redis.
- An `add_worker` that raises is logged and retried on the next scan (the id is not marked known).
- `stop()` never hangs: the loops end on a flag as well as by cancellation, and the tasks and the
  client's close get STOP_TIMEOUT_S each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdserve.shared.cluster.worker_info import (
    EVENTS_CHANNEL,
    HEARTBEAT_S,
    KEY_PREFIX,
    TTL_S,
    Membership,
    WorkerInfo,
)

logger = logging.getLogger(__name__)

_SCAN_COUNT = 1000


class ClusterView:
    STOP_TIMEOUT_S = 3.0

    def __init__(self, redis_url: str, membership: Membership, interval_s: float = HEARTBEAT_S):
        self.redis_url = redis_url
        self.membership = membership
        self.interval_s = interval_s
        self.workers: dict[str, WorkerInfo] = {}  # the last view: worker_id -> what Redis said
        # generous: a busy host (a worker loading a model) can delay even a loopback connect
        timeout = max(TTL_S, interval_s)
        self._client = aioredis.Redis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._outage = False
        self._stopping = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._watch(), name="cluster-view-scan"),
            asyncio.create_task(self._listen(), name="cluster-view-events"),
        ]

    async def stop(self) -> None:
        """Ends the watch and closes the client within STOP_TIMEOUT_S each: a router that shuts
        down must not wait on a Redis connection's teardown (it logs one that did not finish).
        The loops also check `_stopping`: on Python 3.11 a cancel that lands as `wait_for`'s inner
        wait completes (a join event) is swallowed, and a `while True` loop would run on."""
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.STOP_TIMEOUT_S)
            if pending:
                logger.warning(
                    "membership watch still closing after %.0f s; not waiting", self.STOP_TIMEOUT_S
                )
        self._tasks = []
        try:
            await asyncio.wait_for(self._client.aclose(), self.STOP_TIMEOUT_S)
        except (asyncio.TimeoutError, RedisError, OSError) as exc:
            logger.warning("closing the membership client of %s: %r", self.redis_url, exc)

    # ------------------------------------------------------------------ scanning

    async def refresh(self) -> bool:
        """One scan and reconcile; False when Redis could not be read (the view is then unchanged)."""
        try:
            live = await self._scan()
        except (RedisError, OSError) as exc:
            if not self._outage:
                logger.warning(
                    "cannot read membership from %s (keeping the last view): %s", self.redis_url, exc
                )
                self._outage = True
            return False
        if self._outage:
            logger.info("membership readable again at %s", self.redis_url)
            self._outage = False
        await self._reconcile(live)
        return True

    async def _scan(self) -> dict[str, WorkerInfo]:
        keys = [key async for key in self._client.scan_iter(match=KEY_PREFIX + "*", count=_SCAN_COUNT)]
        if not keys:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        live: dict[str, WorkerInfo] = {}
        for key, raw in zip(keys, hashes):
            if not raw:  # expired between SCAN and HGETALL
                continue
            try:
                info = WorkerInfo.from_redis(raw)
            except (TypeError, ValueError) as exc:  # a foreign or older writer: skip, do not crash
                logger.warning("ignoring malformed membership hash %r: %s", key, exc)
                continue
            live[info.worker_id] = info
        return live

    async def _reconcile(self, live: dict[str, WorkerInfo]) -> None:
        for worker_id in [w for w in self.workers if w not in live]:
            del self.workers[worker_id]
            logger.info("worker %s: membership key gone", worker_id)
            await self.membership.remove_worker(worker_id, expired=True)
        for worker_id, info in live.items():
            known = self.workers.get(worker_id)
            if known is not None and (known.zmq_addr, known.started_at) == (info.zmq_addr, info.started_at):
                self.workers[worker_id] = info
                self.membership.update_load(info)
                continue
            try:
                await self.membership.add_worker(info)
            except Exception:  # one bad worker must not stop the watch; retried next scan
                logger.exception("adding worker %s (%s) failed; retrying next scan", worker_id, info.zmq_addr)
                continue
            self.workers[worker_id] = info
            logger.info("worker %s joined: role=%s zmq=%s", worker_id, info.role, info.zmq_addr)

    async def _watch(self) -> None:
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a Membership bug must not end the watch
                logger.exception("membership scan failed")

    # ------------------------------------------------------------------ events

    async def _on_event(self, data: object) -> None:
        """A "leave" removes the worker at once (it drains: no new requests go there)."""
        try:
            event = json.loads(data)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if not isinstance(event, dict) or event.get("event") != "leave":
            return
        worker_id = event.get("worker_id")
        if isinstance(worker_id, str) and self.workers.pop(worker_id, None) is not None:
            logger.info("worker %s left", worker_id)
            await self.membership.remove_worker(worker_id)

    async def _listen(self) -> None:
        """Wakes the scan on every join/leave event; reconnects after an outage."""
        while not self._stopping:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)
                while not self._stopping:
                    msg = await pubsub.get_message(timeout=self.interval_s)
                    if msg is not None:
                        await self._on_event(msg.get("data"))
                        self._wake.set()
            except (RedisError, OSError) as exc:
                logger.debug("event subscription to %s lost: %s", self.redis_url, exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(self.interval_s)
