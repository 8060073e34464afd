"""Keeping `serve`'s children running: a child that exits on its own is started again.

    supervisor = Supervisor(RestartRules(), ready_timeout_s=600.0)
    supervisor.add(router); supervisor.add(worker, after="prefill-0"); supervisor.add(RedisChild(redis))
    supervisor.run(stop)     # returns when stop is set; ChildGaveUp when a child's restarts keep failing

Rules:
- Each child has its own RestartPolicy (restart_policy.py): it decides the delay or to give up;
  this file only polls, logs and starts. One `step()` is one pass over the children, so tests
  drive it with fake children and a fake clock.
- An exit is logged at once, naming the child, its pid, its exit status or signal, and the delay.
  The others keep running meanwhile: the router drops a dead worker and sees its restart join
  through Redis; workers keep their streams while the router or Redis is away.
- The restart runs the same command (same port for the router and Redis). A child started `after`
  another (a worker sharing a GPU, which sizes its memory after the one before) waits until that
  one is ready. A restart that raises (no binary, Redis not answering) counts as an exit before
  ready; so does a restarted child that is not ready within `ready_timeout_s` (it is SIGKILLed:
  a child stuck while starting must not hold its place for ever).
- Giving up raises ChildGaveUp naming the child, why, and the end of its output; `serve` then
  stops everything and exits 1.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pdserve.shared.cluster.redis_server import EmbeddedRedis, RedisServerError
from pdserve.shared.launch.serve.restart_policy import GiveUp, RestartPolicy, RestartRules

logger = logging.getLogger("pdserve.serve")

POLL_S = 0.1


class Supervised(Protocol):
    name: str

    @property
    def pid(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def is_ready(self) -> bool: ...

    def restart(self) -> None: ...

    def tail(self) -> str: ...

    def kill(self) -> None: ...


class ChildGaveUp(RuntimeError):
    pass


class RedisChild:
    """The embedded Redis as a supervised child: ready once it answers, which `restart()` waits for."""

    name = "redis"

    def __init__(self, redis: EmbeddedRedis):
        self.redis = redis

    @property
    def pid(self) -> int | None:
        return self.redis.pid

    def poll(self) -> int | None:
        return self.redis.poll()

    def is_ready(self) -> bool:
        return self.redis.poll() is None

    def restart(self) -> None:
        self.redis.restart()

    def tail(self) -> str:
        return self.redis.log_tail()

    def kill(self) -> None:
        pid = self.redis.pid
        if pid is not None and self.redis.poll() is None:
            os.kill(pid, signal.SIGKILL)


def describe_exit(status: int | None) -> str:
    """`status 1`, `signal SIGKILL` (a negative Popen status), or `a failed start`."""
    if status is None:
        return "a failed start"
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


@dataclass
class _Slot:
    child: Supervised
    policy: RestartPolicy
    after: str | None
    pid: int | None
    restart_at: float | None = None  # set while a restart is pending
    ready: bool = True  # this run was seen ready (the policy was told)
    ready_by: float | None = None  # a restarted run not ready by then is killed


class Supervisor:
    def __init__(
        self, rules: RestartRules, ready_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self.rules = rules
        self.ready_timeout_s = ready_timeout_s
        self._clock = clock
        self._slots: dict[str, _Slot] = {}

    def add(self, child: Supervised, after: str | None = None) -> None:
        """A child that runs and is ready; `after`: the child that must be ready before it restarts."""
        self._slots[child.name] = _Slot(child, RestartPolicy(self.rules, self._clock()), after, child.pid)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(POLL_S):
            self.step()

    def step(self) -> None:
        for slot in self._slots.values():
            now = self._clock()
            if slot.restart_at is not None:
                if now >= slot.restart_at and self._may_start(slot):
                    self._restart(slot, now)
                continue
            status = slot.child.poll()
            if status is not None:
                self._exited(slot, status, now)
            elif not slot.ready and slot.child.is_ready():
                slot.ready = True
                slot.policy.ready(now)
                logger.warning("%s is ready again (pid %s)", slot.child.name, slot.child.pid)
            elif not slot.ready and slot.ready_by is not None and now > slot.ready_by:
                logger.warning(
                    "%s (pid %s) not ready %.0f s after its restart: killing it",
                    slot.child.name,
                    slot.pid,
                    self.ready_timeout_s,
                )
                slot.ready_by = None
                slot.child.kill()  # the next step sees the exit

    def _may_start(self, slot: _Slot) -> bool:
        before = self._slots.get(slot.after) if slot.after else None
        return before is None or (before.restart_at is None and before.ready)

    def _restart(self, slot: _Slot, now: float) -> None:
        slot.restart_at = None
        slot.ready = False
        slot.policy.started(now)
        try:
            slot.child.restart()
        except (OSError, RedisServerError) as exc:
            logger.warning("%s did not start again: %s", slot.child.name, exc)
            self._exited(slot, None, self._clock())
            return
        slot.pid = slot.child.pid
        slot.ready_by = now + self.ready_timeout_s
        logger.info("%s started again (pid %s)", slot.child.name, slot.pid)

    def _exited(self, slot: _Slot, status: int | None, now: float) -> None:
        name, how = slot.child.name, describe_exit(status)
        decision = slot.policy.exited(now)
        if isinstance(decision, GiveUp):
            raise ChildGaveUp(
                f"{name} exited with {how} and {decision.reason}: giving up; its last output:\n"
                f"{slot.child.tail() or '(nothing)'}"
            )
        logger.warning("%s (pid %s) exited with %s; restarting it in %.0f s", name, slot.pid, how, decision)
        slot.restart_at = now + decision
