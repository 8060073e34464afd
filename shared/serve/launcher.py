"""Starting, watching and stopping everything `serve` runs: Redis, the workers, the router.

Life cycle:
  1. Redis: an EmbeddedRedis unless a URL was given (then nothing is started for it);
  2. every worker of the plan and the router, all at once (workers load while the router starts;
     the router learns the workers from Redis as they become ready), except that a worker sharing
     a GPU with an earlier one starts once that one is ready (`wait_worker_ready`);
  3. ready when every worker printed its ready line and the router's /health answers 200, before
     the deadline; otherwise the failing child (the first to exit, or the slowest) is named with
     the tail of its output, everything is stopped, and `StartupError` is raised;
  4. `watch()` returns when `stop` is set (a signal) or a child exits on its own (named, with its tail);
  5. `stop_all()` stops the router first (no new requests), then the workers (each aborts what it
     still runs), then Redis. Each gets SIGTERM and a grace period, then SIGKILL. `kill_all()`
     (a second Ctrl-C) SIGKILLs whatever is left at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from pdserve.shared.redis_server import EmbeddedRedis
from pdserve.shared.serve.children import ChildProcess
from pdserve.shared.worker.launch import http_status

logger = logging.getLogger("pdserve.serve")

POLL_S = 0.1
ROUTER_GRACE_S = 10.0
WORKER_GRACE_S = 15.0


class StartupError(RuntimeError):
    pass


class ChildExited(RuntimeError):
    pass


def _failure(child: ChildProcess, what: str) -> str:
    return f"{child.name} {what}; its last output:\n{child.tail() or '(nothing)'}"


class Cluster:
    def __init__(self, on_child_start: Callable[[ChildProcess], None] | None = None):
        self.redis: EmbeddedRedis | None = None
        self.workers: list[ChildProcess] = []
        self.router: ChildProcess | None = None
        self._on_child_start = on_child_start

    @property
    def children(self) -> list[ChildProcess]:
        return ([self.router] if self.router else []) + self.workers

    def start_redis(self) -> str:
        self.redis = EmbeddedRedis()
        logger.info("embedded Redis (%s) at %s", self.redis.binary, self.redis.url)
        return self.redis.url

    def start_worker(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.workers.append(self._start(name, cmd, env))

    def wait_worker_ready(self, name: str, timeout_s: float, stop: threading.Event) -> None:
        """Blocks until the started worker `name` printed its ready line; StartupError if it exits
        or the deadline passes first (returns early when `stop` is set)."""
        child = next(w for w in self.workers if w.name == name)
        deadline = time.monotonic() + timeout_s
        while not child.ready.wait(POLL_S) and not stop.is_set():
            status = child.poll()
            if status is not None:
                raise StartupError(_failure(child, f"exited with status {status} while starting"))
            if time.monotonic() > deadline:
                raise StartupError(_failure(child, f"was not ready after {timeout_s:.0f} s"))

    def start_router(self, cmd: list[str]) -> None:
        self.router = self._start("router", cmd, {})

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> ChildProcess:
        child = ChildProcess(name, cmd, env)
        logger.debug("started %s (pid %d): %s", name, child.pid, " ".join(cmd))
        if self._on_child_start is not None:
            self._on_child_start(child)
        return child

    def wait_ready(self, health_url: str, timeout_s: float, stop: threading.Event) -> bool:
        """True once everything is ready; False if `stop` was set first; StartupError otherwise."""
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            for child in self.children:
                status = child.poll()
                if status is not None:
                    raise StartupError(_failure(child, f"exited with status {status} while starting"))
            if all(w.ready.is_set() for w in self.workers) and http_status(health_url, 1.0) == 200:
                return True
            if time.monotonic() > deadline:
                slow = next((w for w in self.workers if not w.ready.is_set()), self.router)
                raise StartupError(_failure(slow, f"was not ready after {timeout_s:.0f} s"))
            stop.wait(POLL_S)
        return False

    def watch(self, stop: threading.Event) -> None:
        """Returns when stop is set; raises ChildExited when a child exits on its own first."""
        while not stop.wait(POLL_S):
            for child in self.children:
                status = child.poll()
                if status is not None:
                    raise ChildExited(_failure(child, f"exited unexpectedly with status {status}"))

    def stop_all(self) -> None:
        if self.router is not None:
            self.router.stop(ROUTER_GRACE_S)
        for worker in self.workers:  # all at once: each drains its own requests in parallel
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.wait(WORKER_GRACE_S)
        redis, self.redis = self.redis, None
        if redis is not None:
            redis.stop()

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()
        # called from a signal handler that may interrupt stop_all: everything here is idempotent
        redis, self.redis = self.redis, None
        if redis is not None:
            redis.stop(grace_s=0)
