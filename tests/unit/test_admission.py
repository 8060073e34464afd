"""The router's admission queue (router/serving/admission.py) and its async gate
(router/serving/admission_gate.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from pdserve.router.serving.admission import AdmissionConfig, AdmissionQueue, Ticket, TicketState
from pdserve.router.serving.admission_gate import AdmissionGate, QueueFull, parse_priority
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.serving.metrics import RouterMetrics

RUNNING, QUEUED, REJECTED = TicketState.RUNNING, TicketState.QUEUED, TicketState.REJECTED


def make_queue(capacity: int | None = 1, **config) -> tuple[AdmissionQueue, list[int | None]]:
    slots = [capacity]  # mutable: tests change the cluster's capacity
    return AdmissionQueue(AdmissionConfig(**config), lambda: slots[0]), slots


def offer_all(queue: AdmissionQueue, priorities: list[int | None]) -> list[Ticket]:
    return [queue.offer(p, now=float(i)).ticket for i, p in enumerate(priorities)]


def drain_order(queue: AdmissionQueue, running: list[Ticket]) -> list[Ticket]:
    """Releases running tickets one at a time; the tickets in the order they were admitted."""
    order = []
    while running:
        woken = queue.release(running.pop(0), now=100.0)
        order += woken
        running += woken
    return order


# ---------------------------------------------------------------------- the pure queue


def test_fifo_up_to_capacity_then_release_admits_the_next():
    queue, _ = make_queue(capacity=2)
    a, b, c, d = offer_all(queue, [None] * 4)
    assert [t.state for t in (a, b, c, d)] == [RUNNING, RUNNING, QUEUED, QUEUED]
    assert (queue.running, queue.queued) == (2, 2)
    assert queue.release(b, now=10.0) == [c]
    assert c.state is RUNNING and c.waited == 10.0 - 2.0
    assert queue.release(b, now=11.0) == []  # idempotent: b's slot was given back once
    assert queue.release(a, now=12.0) == [d]
    assert queue.release(c, now=13.0) == [] and queue.release(d, now=13.0) == []
    assert (queue.running, queue.queued) == (0, 0)
    assert a.state is TicketState.DONE and a.waited == 0.0


def test_no_worker_admits_at_once_and_capacity_growth_is_pumped():
    queue, slots = make_queue(capacity=None)
    assert all(t.state is RUNNING for t in offer_all(queue, [None] * 5))
    queue, slots = make_queue(capacity=0)
    a, b = offer_all(queue, [None, None])
    assert (a.state, b.state) == (QUEUED, QUEUED)
    slots[0] = 1  # a worker joined
    assert queue.pump(now=5.0) == [a]
    slots[0] = 3
    decision = queue.offer(None, now=6.0)  # waiting tickets go first, then the newcomer
    assert decision.woken == [b] and decision.ticket.state is RUNNING


def test_full_queue_rejects_and_zero_means_no_queue():
    queue, _ = make_queue(capacity=1, max_queued=2)
    tickets = offer_all(queue, [None] * 5)
    assert [t.state for t in tickets] == [RUNNING, QUEUED, QUEUED, REJECTED, REJECTED]
    assert queue.queued == 2
    queue, _ = make_queue(capacity=1, max_queued=0)
    assert [t.state for t in offer_all(queue, [None, None])] == [RUNNING, REJECTED]


def test_priority_ignored_without_priority_scheduling():
    queue, _ = make_queue(capacity=1, max_queued=2)
    first, *queued = offer_all(queue, [0, 1, 5, 9])
    assert queued[2].state is REJECTED  # no eviction either
    assert drain_order(queue, [first]) == queued[:2]


@pytest.mark.parametrize("low_first", [False, True])
def test_priority_order_fifo_among_equals_and_none_last(low_first):
    queue, _ = make_queue(capacity=1, priority_scheduling=True, low_priority_values_first=low_first)
    first, *queued = offer_all(queue, [0, None, 1, 5, 1, -3, 5])
    by_priority = sorted(
        (t for t in queued if t.priority is not None),
        key=lambda t: (t.priority if low_first else -t.priority, t.seq),
    )
    expected = by_priority + [t for t in queued if t.priority is None]
    assert drain_order(queue, [first]) == expected
    if not low_first:
        assert [t.priority for t in expected] == [5, 5, 1, 1, -3, None]


def test_full_queue_evicts_the_least_preferred_newest_for_a_strictly_better_newcomer():
    queue, _ = make_queue(capacity=1, max_queued=3, priority_scheduling=True)
    first, low_old, low_new, high = offer_all(queue, [0, 1, 1, 7])
    same = queue.offer(1, now=10.0)  # not strictly better than the worst queued: rejected
    assert same.ticket.state is REJECTED and same.evicted is None
    better = queue.offer(2, now=11.0)
    assert better.evicted is low_new and low_new.state is TicketState.EVICTED
    assert better.ticket.state is QUEUED and queue.queued == 3
    unprioritized = queue.offer(None, now=12.0)  # no priority ranks below every priority
    assert unprioritized.ticket.state is REJECTED
    assert drain_order(queue, [first]) == [high, better.ticket, low_old]


def test_leave_removes_a_queued_ticket_only():
    queue, _ = make_queue(capacity=1)
    a, b, c = offer_all(queue, [None] * 3)
    assert queue.leave(b) and b.state is TicketState.LEFT
    assert not queue.leave(b) and not queue.leave(a)
    assert queue.queued == 1
    assert queue.release(a, now=1.0) == [c]


def test_retry_after_estimates_the_drain_time():
    queue, _ = make_queue(capacity=2, max_queued=4)
    assert queue.retry_after() == 1  # nothing finished yet: the floor
    a, b, *_ = offer_all(queue, [None] * 6)  # 2 running, 4 queued
    queue.release(a, now=10.0)  # held 10 s; its slot admits one of the 4 queued
    assert queue.retry_after() == 10 * (3 + 1) // 2  # mean hold x (queued + 1) / capacity
    queue.release(b, now=1000.0)  # held 1000 s
    assert queue.retry_after() == 60  # clamped


def test_random_operations_keep_the_counts_and_the_heap_consistent():
    rng = random.Random(7)
    queue, slots = make_queue(capacity=3, max_queued=20, priority_scheduling=True)
    live: list[Ticket] = []
    for step in range(5000):
        op = rng.random()
        if op < 0.45:
            decision = queue.offer(rng.choice([None, 0, 1, 2, 3]), now=float(step))
            live.append(decision.ticket)
        elif op < 0.7 and live:
            queue.release(rng.choice(live), now=float(step))
        elif op < 0.9 and live:
            queue.leave(rng.choice(live))
        else:
            slots[0] = rng.choice([0, 1, 3, 5])
            queue.pump(float(step))
        states = [t.state for t in live]
        assert queue.running == states.count(RUNNING)
        assert queue.queued == states.count(QUEUED) <= 20
        assert len(queue._heap) <= 2 * queue.queued + 64  # departed tickets do not pile up
    for t in live:
        queue.leave(t)
        queue.release(t, now=1e6)
    assert (queue.running, queue.queued) == (0, 0)


def test_parse_priority():
    assert parse_priority(None) is None and parse_priority(-4) == -4
    for bad in ("1", 1.5, True, [1]):
        with pytest.raises(GenerationError) as err:
            parse_priority(bad)
        assert err.value.status == 400


# ---------------------------------------------------------------------- the async gate


def make_gate(capacity: int | None = 1, timeout_s: float | None = None, **config):
    queue, slots = make_queue(capacity, **config)
    metrics = RouterMetrics()
    return AdmissionGate(queue, metrics, timeout_s, poll_s=0.02), metrics, slots


def sample(metrics: RouterMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(f"pdserve_router_{name}", labels)
    return 0.0 if value is None else value


def test_gate_admits_without_yielding_queues_and_answers_429_when_full():
    async def main():
        gate, metrics, _ = make_gate(capacity=1, max_queued=1)
        coro = gate.acquire()
        with pytest.raises(StopIteration) as done:  # admitted at once: no suspension at all
            coro.send(None)
        first = done.value.value
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert sample(metrics, "generation_requests_queued") == 1
        with pytest.raises(QueueFull) as full:
            await gate.acquire()
        assert full.value.status == 429 and full.value.err_type == "RateLimitError"
        assert full.value.headers["Retry-After"].isdigit()
        gate.release(first)
        second = await waiting
        assert second.state is RUNNING
        gate.release(second)
        assert sample(metrics, "queue_rejections_total", reason="queue_full") == 1
        assert sample(metrics, "queue_time_seconds_count") == 2
        assert sample(metrics, "generation_requests_queued") == 0

    asyncio.run(main())


def test_gate_eviction_cancel_timeout_and_growth():
    async def main():
        gate, metrics, slots = make_gate(capacity=1, timeout_s=0.2, max_queued=1, priority_scheduling=True)
        running = await gate.acquire()
        low = asyncio.create_task(gate.acquire(0))
        await asyncio.sleep(0)
        high = asyncio.create_task(gate.acquire(5))  # evicts the queued low one
        with pytest.raises(QueueFull, match="higher priority"):
            await low
        assert sample(metrics, "queue_rejections_total", reason="evicted") == 1
        with pytest.raises(GenerationError) as timeout:  # still queued at --request-timeout
            await high
        assert timeout.value.status == 504 and gate.queue.queued == 0
        cancelled = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert gate.queue.queued == 0
        grown = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.01)
        slots[0] = 2  # a worker joined: the waiter's next look admits it
        ticket = await asyncio.wait_for(grown, 1.0)
        gate.release(ticket)
        gate.release(running)
        assert (gate.queue.running, gate.queue.queued, gate._waiters) == (0, 0, {})

    asyncio.run(main())


def test_gate_random_cancellations_leak_no_slot():
    """Many requests hold their slot a random time; a random third are cancelled at a random
    moment (queued, admitted at that very step, or running); counts return to zero."""

    async def main():
        gate, metrics, _ = make_gate(capacity=3, max_queued=40, priority_scheduling=True)
        rng = random.Random(3)
        outcomes: dict[str, int] = {}

        async def request(priority: int) -> None:
            ticket = await gate.acquire(priority)
            try:
                assert gate.queue.running <= 3
                await asyncio.sleep(rng.random() * 0.01)
            finally:
                gate.release(ticket)

        tasks = []
        for i in range(300):
            tasks.append(asyncio.create_task(request(rng.randrange(4))))
            if rng.random() < 0.3:
                victim = rng.choice(tasks)
                asyncio.get_running_loop().call_later(rng.random() * 0.01, victim.cancel)
            if i % 10 == 0:
                await asyncio.sleep(rng.random() * 0.005)
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            name = type(result).__name__ if result is not None else "ok"
            outcomes[name] = outcomes.get(name, 0) + 1
        assert set(outcomes) <= {"ok", "CancelledError", "QueueFull"}
        assert outcomes["ok"] > 50 and outcomes.get("CancelledError", 0) > 10, outcomes
        assert (gate.queue.running, gate.queue.queued, gate._waiters) == (0, 0, {})
        assert sample(metrics, "generation_requests_queued") == 0

    asyncio.run(main())


# ---------------------------------------------------------------------- the router's wiring


def test_router_capacity_is_the_streaming_workers_slots_and_the_queue_is_opt_in():
    from types import SimpleNamespace

    from pdserve.router.cli import args_from, build_parser
    from pdserve.router.state import RouterArgs, RouterState

    def handle(can_serve: bool, args: dict) -> SimpleNamespace:
        return SimpleNamespace(can_serve=can_serve, server_info=SimpleNamespace(args=args))

    args = args_from(
        build_parser().parse_args(["--max-queued-requests", "2", "--enable-priority-scheduling"])
    )
    assert (args.max_queued_requests, args.enable_priority_scheduling) == (2, True)
    state = RouterState(args)
    assert state.cluster_slots() is None  # no worker yet: admitted at once, dispatch says 503
    state.pool.workers = {
        "mixed": handle(True, {"max_running_requests": 3}),
        "decode": handle(True, {}),  # not reported: EngineArgs' default
        "prefill-or-gone": handle(False, {"max_running_requests": 100}),
    }
    assert state.cluster_slots() == 3 + 256
    default = RouterState(RouterArgs())
    default.pool.workers = state.pool.workers
    assert default.admission.queue.offer(None, now=0.0).ticket.state is RUNNING  # workers queue
    with pytest.raises(ValueError, match="max-queued-requests"):
        RouterArgs(max_queued_requests=-1).validate()
