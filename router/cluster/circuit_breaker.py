"""A per-worker circuit breaker: stop sending to a worker that keeps failing, probe it after a pause.

States, in order of trust:

    CLOSED ──(failure_threshold consecutive failures)──▶ OPEN ──(cooldown_s passes)──▶ HALF_OPEN
       ▲                                                   ▲                              │
       └──────────────(the probe succeeds)─────────────────┼──────────────────────────────┘
                                                           └──(the probe fails)───────────┘

Rules:
- only server-side failures are recorded (the worker died, went silent, or reported an internal
  error); a request the worker refused as invalid is the client's fault and is not a failure;
- a success in CLOSED resets the consecutive-failure count;
- HALF_OPEN lets exactly one request through (`allow()` returns True once) until that request's
  outcome is recorded; a probe that never reports back is released after another cooldown;
- time comes from an injectable clock, so tests need not sleep.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.IntEnum):
    OPEN = 0
    HALF_OPEN = 1
    CLOSED = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        if self._state == BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probe_started = None
        return self._state

    def allow(self) -> bool:
        """May a request be sent now? In HALF_OPEN, True for the single probe only."""
        state = self.state
        if state == BreakerState.CLOSED:
            return True
        if state == BreakerState.OPEN:
            return False
        now = self._clock()
        if self._probe_started is None or now - self._probe_started >= self.cooldown_s:
            self._probe_started = now
            return True
        return False

    def would_allow(self) -> bool:
        """Like allow() without taking the half-open probe slot (for listing candidates)."""
        state = self.state
        if state == BreakerState.HALF_OPEN:
            return self._probe_started is None or self._clock() - self._probe_started >= self.cooldown_s
        return state == BreakerState.CLOSED

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_started = None

    def record_failure(self) -> None:
        state = self.state
        if state == BreakerState.OPEN:  # late failures of requests sent before the trip
            return
        self._failures += 1
        if state == BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._trip()

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_started = None
        self.times_opened += 1
