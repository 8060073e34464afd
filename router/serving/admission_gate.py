"""The async face of the admission queue (router/serving/admission.py): where a request waits for its slot.

    ticket = await gate.acquire(inp.priority)   # QueueFull (429), GenerationError 504, or runs
    try:
        ...                                     # dispatch the prompt to a worker
    finally:
        gate.release(ticket)                    # admits the next one

Rules:
- `acquire` returns at once, without yielding to the event loop, when the request may run now;
  else it waits in the queue. A full queue is QueueFull (429, `Retry-After` in seconds) at once;
  a queued request evicted by one of higher priority gets QueueFull then;
- a waiter cancelled (its client left) or past `timeout_s` (`--request-timeout`: 504, as dispatch
  answers a request that runs too long) leaves the queue at once; a waiter cancelled just as it
  was admitted gives its slot back, so none leaks;
- waiters look again every `poll_s`: the capacity grows without a release when a worker joins;
- metrics: `queued` (gauge), `queue_time` (seconds each admitted request waited, 0 when none),
  `queue_rejections{reason}`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pdserve.router.serving.admission import AdmissionQueue, Ticket, TicketState
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.serving.metrics import RouterMetrics

POLL_S = 0.5


class QueueFull(GenerationError):
    """429 with `Retry-After`: the router's queue has no room for the request (or evicted it)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(429, message, "RateLimitError", headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


def parse_priority(value: Any) -> int | None:
    """The request's `priority` field (SGLang: an optional int); GenerationError 400 otherwise."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise GenerationError(400, f"priority must be an integer, got {value!r:.100}.")


class AdmissionGate:
    def __init__(
        self,
        queue: AdmissionQueue,
        metrics: RouterMetrics | None = None,
        timeout_s: float | None = None,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.queue = queue
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._clock = clock
        self._waiters: dict[Ticket, asyncio.Future] = {}

    async def acquire(self, priority: int | None = None) -> Ticket:
        decision = self.queue.offer(priority, self._clock())
        ticket = decision.ticket
        self._wake(decision.woken)
        if decision.evicted is not None:
            self._wake([decision.evicted])  # its waiter sees EVICTED and raises QueueFull
            self._count_rejection("evicted")
        if ticket.state is TicketState.RUNNING:
            self._admitted(ticket)
            return ticket
        if ticket.state is TicketState.REJECTED:
            self._count_rejection("queue_full")
            raise self._full(f"The request queue is full ({self.queue.config.max_queued} queued).")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = waiter
        self._set_gauge()
        try:
            await self._wait(ticket, waiter)
        except BaseException:
            self._waiters.pop(ticket, None)
            if ticket.state is TicketState.RUNNING:
                self.release(ticket)  # admitted while its client left: the slot goes to the next
            elif self.queue.leave(ticket):
                self._set_gauge()
            raise
        if ticket.state is TicketState.EVICTED:
            raise self._full("The request was evicted from the queue by a request of higher priority.")
        return ticket

    def release(self, ticket: Ticket) -> None:
        self._wake(self.queue.release(ticket, self._clock()))

    def pump(self) -> None:
        """Admits what the capacity allows now (after a worker joined)."""
        self._wake(self.queue.pump(self._clock()))

    # ------------------------------------------------------------------ helpers

    async def _wait(self, ticket: Ticket, waiter: asyncio.Future) -> None:
        deadline = None if self._timeout_s is None else ticket.queued_at + self._timeout_s
        while not waiter.done():
            wait = self._poll_s if deadline is None else min(self._poll_s, deadline - self._clock())
            if wait <= 0:
                raise GenerationError(
                    504,
                    f"The request timed out after {self._timeout_s:g} s (--request-timeout) "
                    "in the router's queue.",
                    "TimeoutError",
                )
            await asyncio.wait([waiter], timeout=wait)
            if not waiter.done():
                self.pump()

    def _wake(self, tickets: list[Ticket]) -> None:
        """Resolves the waiters of tickets that were admitted (or evicted)."""
        for ticket in tickets:
            if ticket.state is TicketState.RUNNING:
                self._admitted(ticket)
            waiter = self._waiters.pop(ticket, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if tickets:
            self._set_gauge()

    def _admitted(self, ticket: Ticket) -> None:
        if self._metrics is not None:
            self._metrics.queue_time.observe(ticket.waited or 0.0)

    def _full(self, message: str) -> QueueFull:
        return QueueFull(message, self.queue.retry_after())

    def _count_rejection(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.queue_rejections.labels(reason).inc()

    def _set_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.queued.set(self.queue.queued)
