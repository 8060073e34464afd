"""When to restart a child of `serve` that exited on its own, and when to give up: no I/O, no clock.

    policy = RestartPolicy(RestartRules(), now=clock())   # the child runs and is ready
    decision = policy.exited(now)     # a delay in seconds, or GiveUp(reason)
    policy.started(now); policy.ready(now)                # the restarted child's progress

Rules:
- Delays grow exponentially: `first_delay_s`, twice that, four times ... capped at `max_delay_s`.
- A child that stayed ready for `stable_after_s` before it exited starts over at `first_delay_s`:
  one crash a day is not a crash loop.
- Give up when the child exited before becoming ready `max_failed_starts` times in a row (its
  restarts keep failing: a port taken, a device gone), or when it would be restarted more than
  `max_restarts` times within `window_s` (it comes up, then crashes again and again).
- The policy is created for a child that runs and is ready (`serve` only restarts children of a
  cluster that served once; a child that fails its first start fails `serve`'s start).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartRules:
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0
    max_failed_starts: int = 5  # exits before ready, in a row
    max_restarts: int = 10  # within window_s
    window_s: float = 600.0

    def validate(self) -> None:
        if self.max_failed_starts < 1 or self.max_restarts < 1:
            raise ValueError("restart limits must be >= 1")
        if not 0 < self.first_delay_s <= self.max_delay_s:
            raise ValueError("restart delays must satisfy 0 < first <= max")


@dataclass(frozen=True)
class GiveUp:
    reason: str  # completes "<child> ..." in the message serve prints


class RestartPolicy:
    def __init__(self, rules: RestartRules, now: float):
        rules.validate()
        self.rules = rules
        self._ready_at: float | None = now
        self._level = 0  # the next delay is first_delay_s * 2**level
        self._failed_starts = 0
        self._restarts: collections.deque[float] = collections.deque()

    def started(self, now: float) -> None:
        self._ready_at = None

    def ready(self, now: float) -> None:
        self._ready_at = now
        self._failed_starts = 0

    def exited(self, now: float) -> float | GiveUp:
        """The seconds to wait before starting the child again, or GiveUp."""
        r = self.rules
        if self._ready_at is None:
            self._failed_starts += 1
        elif now - self._ready_at >= r.stable_after_s:
            self._level = 0
        self._ready_at = None
        while self._restarts and self._restarts[0] <= now - r.window_s:
            self._restarts.popleft()
        if self._failed_starts >= r.max_failed_starts:
            return GiveUp(f"exited before becoming ready {self._failed_starts} times in a row")
        if len(self._restarts) >= r.max_restarts:
            return GiveUp(f"exited {len(self._restarts) + 1} times within {r.window_s:.0f} s")
        self._restarts.append(now)
        delay = min(r.max_delay_s, r.first_delay_s * 2**self._level)
        if delay < r.max_delay_s:  # past the cap the level stops growing (no float overflow)
            self._level += 1
        return delay
