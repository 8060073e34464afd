"""Admission control at the router: a bounded queue in front of the cluster's running slots.

    queue = AdmissionQueue(AdmissionConfig(max_queued=8), capacity=lambda: 4)
    decision = queue.offer(priority=None, now=t)   # ticket RUNNING, QUEUED or REJECTED (+ evicted, woken)
    woken = queue.pump(now)                        # capacity may have grown (a worker joined)
    woken = queue.release(ticket, now)             # a running request ended: its slot admits the next
    queue.leave(ticket)                            # a queued request left (client gone, timed out)

No clock, no asyncio: times come in as arguments (router/serving/admission_gate.py is the async face).

A ticket's life (TicketState, in order): QUEUED, then RUNNING, then DONE; or it ends in the queue
as LEFT (its client went away, or it timed out) or EVICTED (a request of higher priority took its
place in the full queue); or it is REJECTED at once (the queue is full).

Rules (SGLang's scheduler applies the same ones to its waiting queue, `--max-queued-requests`,
`--enable-priority-scheduling`, `--schedule-low-priority-values-first`):
- a request runs when `running < capacity()`: the slots of the workers that stream requests (the
  sum of their `max_running_requests`) against this router's requests running now. `capacity()`
  None admits at once: no such worker (dispatch then answers 503 with the reason), or no queue
  asked for (router/state.py: neither a bound nor priorities, so the workers queue);
- one ticket is one prompt sent to a worker (a batch of 4 prompts takes 4);
- the queue is FIFO; with priority scheduling it is ordered by priority, larger values first (or
  smaller ones with `low_priority_values_first`), FIFO among equals; a request without priority
  comes after every request with one. Without priority scheduling, priority is ignored;
- a full queue (`max_queued` tickets; None: no bound) rejects the newcomer; with priority
  scheduling, a newcomer strictly preferred to the least preferred queued ticket (the newest among
  equals) evicts that one and takes its place;
- `retry_after()`: seconds a rejected client should wait, an estimate of the time the queue takes
  to drain (the mean time a slot is held, times the queue length plus one, over the capacity),
  clamped to 1..60.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60
_HOLD_EWMA_WEIGHT = 0.1  # of each finished run in the mean slot hold time
_COMPACT_SLACK = 64  # heap entries of departed tickets tolerated before the heap is rebuilt


class TicketState(enum.IntEnum):
    QUEUED = 0
    RUNNING = 1
    DONE = 2
    LEFT = 3
    EVICTED = 4
    REJECTED = 5


@dataclass(eq=False)  # identity: tickets key the gate's waiters
class Ticket:
    seq: int  # arrival order
    priority: int | None
    rank: float  # lower runs first: (rank, seq) orders the queue
    queued_at: float
    state: TicketState = TicketState.QUEUED
    admitted_at: float | None = None

    @property
    def waited(self) -> float | None:
        """Seconds spent in the queue, once admitted."""
        return None if self.admitted_at is None else self.admitted_at - self.queued_at


@dataclass
class Decision:
    """What `offer` did: the newcomer's ticket, a queued ticket it evicted, and tickets it admitted."""

    ticket: Ticket
    evicted: Ticket | None = None
    woken: list[Ticket] = field(default_factory=list)  # other tickets admitted meanwhile


@dataclass(frozen=True)
class AdmissionConfig:
    max_queued: int | None = None  # None: no bound
    priority_scheduling: bool = False
    low_priority_values_first: bool = False


class AdmissionQueue:
    def __init__(self, config: AdmissionConfig, capacity: Callable[[], int | None]):
        self.config = config
        self._capacity = capacity
        self._heap: list[tuple[float, int, Ticket]] = []  # departed tickets stay until popped
        self._queued = 0
        self._running = 0
        self._seq = 0
        self._mean_hold_s: float | None = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._queued

    def rank(self, priority: int | None) -> float:
        if not self.config.priority_scheduling:
            return 0
        if priority is None:
            return math.inf
        return priority if self.config.low_priority_values_first else -priority

    # ------------------------------------------------------------------ transitions

    def offer(self, priority: int | None, now: float) -> Decision:
        self._seq += 1
        ticket = Ticket(self._seq, priority, self.rank(priority), now)
        woken = self.pump(now)  # first those waiting, if capacity grew
        if not self._queued and self._has_room():
            self._admit(ticket, now)
            return Decision(ticket, woken=woken)
        evicted = None
        limit = self.config.max_queued
        if limit is not None and self._queued >= limit:
            evicted = self._eviction_candidate(ticket)
            if evicted is None:
                ticket.state = TicketState.REJECTED
                return Decision(ticket, woken=woken)
            evicted.state = TicketState.EVICTED
            self._queued -= 1
        heapq.heappush(self._heap, (ticket.rank, ticket.seq, ticket))
        self._queued += 1
        return Decision(ticket, evicted, woken)

    def pump(self, now: float) -> list[Ticket]:
        """Admits queued tickets, best first, while there is room; returns them."""
        woken = []
        while self._queued and self._has_room():
            _, _, ticket = heapq.heappop(self._heap)
            if ticket.state is not TicketState.QUEUED:
                continue  # left or evicted earlier
            self._queued -= 1
            self._admit(ticket, now)
            woken.append(ticket)
        self._compact()
        return woken

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A running ticket's request ended; returns the tickets its slot admitted. Idempotent."""
        if ticket.state is not TicketState.RUNNING:
            return []
        ticket.state = TicketState.DONE
        self._running -= 1
        held = now - ticket.admitted_at if ticket.admitted_at is not None else 0.0
        mean = self._mean_hold_s
        self._mean_hold_s = held if mean is None else mean + _HOLD_EWMA_WEIGHT * (held - mean)
        return self.pump(now)

    def leave(self, ticket: Ticket) -> bool:
        """A queued ticket leaves the queue (its client left, or it timed out); False if not queued."""
        if ticket.state is not TicketState.QUEUED:
            return False
        ticket.state = TicketState.LEFT
        self._queued -= 1
        self._compact()
        return True

    def retry_after(self) -> int:
        capacity = self._capacity() or 1
        hold = self._mean_hold_s or 0.0
        estimate = math.ceil(hold * (self._queued + 1) / capacity)
        return min(max(estimate, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)

    # ------------------------------------------------------------------ helpers

    def _has_room(self) -> bool:
        capacity = self._capacity()
        return capacity is None or self._running < capacity

    def _admit(self, ticket: Ticket, now: float) -> None:
        ticket.state = TicketState.RUNNING
        ticket.admitted_at = now
        self._running += 1

    def _eviction_candidate(self, newcomer: Ticket) -> Ticket | None:
        """The least preferred queued ticket (the newest among equals), if newcomer is strictly preferred."""
        if not self.config.priority_scheduling:
            return None
        queued = [t for _, _, t in self._heap if t.state is TicketState.QUEUED]
        if not queued:
            return None
        worst = max(queued, key=lambda t: (t.rank, t.seq))
        return worst if newcomer.rank < worst.rank else None

    def _compact(self) -> None:
        if len(self._heap) > 2 * self._queued + _COMPACT_SLACK:
            self._heap = [e for e in self._heap if e[2].state is TicketState.QUEUED]
            heapq.heapify(self._heap)
