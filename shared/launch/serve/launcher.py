"""Starting, supervising and stopping everything `serve` runs: Redis, the workers, the router.

Life cycle:
  1. Redis: an EmbeddedRedis unless a URL was given (then nothing is started for it);
  2. every worker of the plan and the router, all at once (workers load while the router starts;
     the router learns the workers from Redis as they become ready), except that a worker sharing
     a GPU with an earlier one starts once that one is ready (`wait_worker_ready`);
  3. ready when every worker printed its ready line, the router's /health answers 200 and the
     router lists every worker as live (readiness.py), before the deadline; otherwise the failing
     child (the first to exit, or the slowest) is named with the tail of its output and
     `StartupError` is raised. A child that exits before the cluster first served is not
     restarted: a wrong flag or model would fail the same way again;
  4. `watch()` supervises (supervisor.py) until `stop` is set (a signal): a child that exits on
     its own is started again with the same command after a growing delay (restart_policy.py),
     while the others keep serving; ChildGaveUp when one child's restarts keep failing;
  5. `stop_all()` drains: SIGTERM to the router and every worker at once. The router stops
     listening and lets its streams end; each worker leaves the cluster and finishes what it runs
     within its --drain-timeout (then aborts the rest). Each gets that long plus a grace period,
     then SIGKILL; Redis stops last. `kill_all()` (a second Ctrl-C) SIGKILLs whatever is left.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from pdserve.router.cli import READY_PREFIX as ROUTER_READY_PREFIX
from pdserve.shared.cluster.redis_server import EmbeddedRedis
from pdserve.shared.launch.serve.children import ChildProcess
from pdserve.shared.launch.serve.readiness import fetch_server_info, missing_workers
from pdserve.shared.launch.serve.restart_policy import RestartRules
from pdserve.shared.launch.serve.supervisor import RedisChild, Supervisor
from pdserve.shared.launch.worker_process import READY_PREFIX as WORKER_READY_PREFIX
from pdserve.shared.launch.worker_process import http_status

logger = logging.getLogger("pdserve.serve")

POLL_S = 0.1
ROUTER_GRACE_S = 10.0
WORKER_GRACE_S = 15.0


class StartupError(RuntimeError):
    pass


def _failure(child: ChildProcess, what: str) -> str:
    return f"{child.name} {what}; its last output:\n{child.tail() or '(nothing)'}"


class Cluster:
    def __init__(self, on_child_start: Callable[[ChildProcess], None] | None = None):
        self.redis: EmbeddedRedis | None = None
        self.workers: list[ChildProcess] = []
        self.router: ChildProcess | None = None
        self._on_child_start = on_child_start
        self._started_after: dict[str, str] = {}  # worker -> the worker it waits for (a shared GPU)

    @property
    def children(self) -> list[ChildProcess]:
        return ([self.router] if self.router else []) + self.workers

    def start_redis(self) -> str:
        self.redis = EmbeddedRedis()
        logger.info("embedded Redis (%s) at %s", self.redis.binary, self.redis.url)
        return self.redis.url

    def start_worker(self, name: str, cmd: list[str], env: dict[str, str], after: str | None = None) -> None:
        self.workers.append(self._start(name, cmd, env))
        if after is not None:
            self._started_after[name] = after

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
        """Starts the router; it prints its ready line once it can serve (`--ready-when-serving`),
        so the line echoed among the children's output is not a promise made too early."""
        self.router = self._start("router", [*cmd, "--ready-when-serving"], {}, ROUTER_READY_PREFIX)

    def _start(
        self, name: str, cmd: list[str], env: dict[str, str], ready_prefix: str = WORKER_READY_PREFIX
    ) -> ChildProcess:
        child = ChildProcess(name, cmd, env, ready_prefix=ready_prefix)
        logger.debug("started %s (pid %d): %s", name, child.pid, " ".join(cmd))
        if self._on_child_start is not None:
            self._on_child_start(child)
        return child

    def wait_ready(
        self, base_url: str, timeout_s: float, stop: threading.Event, api_key: str | None = None
    ) -> bool:
        """True once everything is ready (module rules, step 3); False if `stop` was set first;
        StartupError otherwise. api_key: the router's, for /get_server_info."""
        deadline = time.monotonic() + timeout_s
        missing: list[str] = []
        while not stop.is_set():
            for child in self.children:
                status = child.poll()
                if status is not None:
                    raise StartupError(_failure(child, f"exited with status {status} while starting"))
            if all(w.ready.is_set() for w in self.workers) and http_status(base_url + "/health", 1.0) == 200:
                info = fetch_server_info(base_url, api_key)
                addrs = {w.name: w.ready_fields.get("zmq", "") for w in self.workers}
                missing = list(addrs) if info is None else missing_workers(info, addrs)
                if not missing:
                    return True
            if time.monotonic() > deadline:
                slow = next((w for w in self.workers if not w.ready.is_set()), None)
                if slow is None:
                    slow = next((w for w in self.workers if w.name in missing), self.router)
                    raise StartupError(
                        _failure(slow, f"was not listed as live by the router after {timeout_s:.0f} s")
                    )
                raise StartupError(_failure(slow, f"was not ready after {timeout_s:.0f} s"))
            stop.wait(POLL_S)
        return False

    def watch(self, stop: threading.Event, rules: RestartRules, ready_timeout_s: float) -> None:
        """Supervises every child until stop is set; ChildGaveUp when one's restarts keep failing."""
        supervisor = Supervisor(rules, ready_timeout_s)
        if self.redis is not None:
            supervisor.add(RedisChild(self.redis))
        if self.router is not None:
            supervisor.add(self.router)
        for worker in self.workers:
            supervisor.add(worker, after=self._started_after.get(worker.name))
        supervisor.run(stop)

    def stop_all(self, drain_s: float = 0.0) -> None:
        """Stops everything (step 5); drain_s: the workers' --drain-timeout."""
        # All at once: the router stops listening and lets its streams end (aiohttp waits for its
        # handlers), while each worker leaves the cluster and finishes what it runs (its drain).
        for child in self.children:
            child.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.wait(drain_s + WORKER_GRACE_S)
        if self.router is not None:
            self.router.wait(ROUTER_GRACE_S)
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
