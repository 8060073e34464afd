"""A worker's membership in Redis: a heartbeat thread that keeps `pdserve:worker:<id>` alive.

    registration = WorkerRegistration(redis_url, info)   # info: WorkerInfo (cluster_types.py)
    registration.start()                                 # once ready to serve: first beat written
    registration.publish_load(snapshot)                  # from the loop thread, any time
    registration.close()                                 # clean shutdown: key deleted, "leave" sent

Rules:
- Every `HEARTBEAT_S` the thread writes the whole hash (`info.to_redis()`) and sets its TTL to
  `TTL_S` in one pipeline, so a worker that stops beating (SIGKILL, a hung host) vanishes on its own
  after about three missed beats. The first successful beat also publishes
  `{"event": "join", "worker_id": ...}` on `EVENTS_CHANNEL`; `close()` deletes the key and publishes
  `{"event": "leave", ...}`, so routers react without waiting for the TTL.
- The thread owns its own sync Redis client; the engine loop only calls `publish_load`, which
  stores numbers under a lock and never touches the network, so Redis can never stall the engine.
- Redis unreachable: the beat is logged (once per outage, not once per beat) and retried on the
  next beat; the worker keeps serving whoever already knows it. After an outage the key is
  rewritten in full and "join" is published again.
- Load fields: `num_free_pages` is what a new request could get (free + evictable cached pages),
  the number a router ranks workers by; `num_total_pages` is the pool's size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading

import redis

from pdserve.shared.cluster.worker_info import EVENTS_CHANNEL, HEARTBEAT_S, TTL_S, WorkerInfo

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def advertise_host(bind_host: str) -> str:
    """The host other machines should dial: the bind address, unless it is a wildcard, in which
    case this machine's primary address (loopback when that cannot be resolved)."""
    if bind_host not in _WILDCARD_HOSTS:
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def default_worker_id(role: str, host: str, port: int) -> str:
    """Unique per host and ZMQ port: `<role>@<host>:<port>` (a restarted worker keeps its id)."""
    return f"{role}@{host}:{port}"


def event_payload(event: str, worker_id: str) -> str:
    return json.dumps({"event": event, "worker_id": worker_id})


class WorkerRegistration:
    def __init__(
        self, redis_url: str, info: WorkerInfo, heartbeat_s: float = HEARTBEAT_S, ttl_s: float = TTL_S
    ):
        self.redis_url = redis_url
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._info = dataclasses.replace(info)
        self._lock = threading.Lock()  # guards _info between the loop thread and the beat thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._joined = False  # whether the last beat succeeded (a failed one means: announce again)
        self._outage_logged = False

    @property
    def worker_id(self) -> str:
        return self._info.worker_id

    def publish_load(self, num_running: int, num_waiting: int, num_free_pages: int) -> None:
        """Called by the loop thread; the next beat carries these numbers."""
        with self._lock:
            self._info.num_running = num_running
            self._info.num_waiting = num_waiting
            self._info.num_free_pages = num_free_pages

    def start(self) -> None:
        """Writes the first beat before returning (so a worker announcing readiness is already
        visible; a failure is logged and retried), then beats from a daemon thread."""
        client = self._client()
        try:
            self._beat(client)
        finally:
            client.close()
        self._thread = threading.Thread(target=self._run, name="redis-heartbeat", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stops beating, deletes the key and announces the leave (best effort when Redis is down).
        Only the first call does anything (a draining worker leaves before its sockets close)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        client = self._client()
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.delete(self._info.key)
                pipe.publish(EVENTS_CHANNEL, event_payload("leave", self.worker_id))
                pipe.execute()
            logger.info("left the cluster at %s as %s", self.redis_url, self.worker_id)
        except redis.RedisError as exc:
            logger.warning("could not deregister %s from %s: %s", self.worker_id, self.redis_url, exc)
        finally:
            client.close()

    def _client(self) -> redis.Redis:
        # a beat may take until the TTL minus one beat before the key is at risk of expiring
        timeout = max(self.ttl_s - self.heartbeat_s, 0.5)
        return redis.Redis.from_url(self.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def _run(self) -> None:
        client = self._client()
        try:
            while not self._stop.wait(self.heartbeat_s):
                self._beat(client)
        finally:
            client.close()

    def _beat(self, client: redis.Redis) -> None:
        with self._lock:
            info = dataclasses.replace(self._info)
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.hset(info.key, mapping=info.to_redis())
                pipe.pexpire(info.key, int(self.ttl_s * 1000))
                if not self._joined:
                    pipe.publish(EVENTS_CHANNEL, event_payload("join", info.worker_id))
                pipe.execute()
        except redis.RedisError as exc:
            if not self._outage_logged:  # once per outage, not once per beat
                logger.warning("heartbeat to %s failed (retrying every beat): %s", self.redis_url, exc)
                self._outage_logged = True
            self._joined = False
            return
        if not self._joined:
            logger.info("joined the cluster at %s as %s", self.redis_url, info.worker_id)
        self._joined = True
        self._outage_logged = False
