"""One attempt of a request on its route, and the request's deadline: what router/serving/dispatch.py's
retry loop drives.

    attempt = Attempt(route, wire_rid)
    attempt.send(req, queue)             # SendFailed naming the worker that could not take it
    attempt.prefill_event(item)          # why the pair failed, or None
    attempt.abort(message); attempt.close()
    deadline = Deadline(timeout_s); queue = deadline.new_queue()   # TIMEOUT arrives in the queue
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pdserve.router.cluster.pairing import Route
from pdserve.router.cluster.worker_conn import WorkerUnavailable
from pdserve.router.cluster.worker_pool import WorkerHandle
from pdserve.router.serving.inbox import Inbox
from pdserve.shared.protocol import GenerateRequest, PrefillDone

TIMEOUT = object()  # put into the request's queue by its deadline timer


@dataclass(frozen=True)
class FromPrefill:
    """What the prefill partner's connection delivered: its PrefillDone, or a StreamFailure."""

    item: Any


class PrefillSide:
    """The queue the prefill partner's connection fills: tags its items, then puts them in the attempt's."""

    def __init__(self, queue: Inbox):
        self._queue = queue

    def put_nowait(self, item: Any) -> None:
        self._queue.put_nowait(FromPrefill(item))


class SendFailed(Exception):
    def __init__(self, handle: WorkerHandle, reason: str):
        super().__init__(reason)
        self.handle, self.reason = handle, reason


class Attempt:
    """One attempt of a request on its route: what was sent where, and what the prefill side said.

    Rules: the streaming worker's message goes first, then the prefill partner's (both subscribed
    before either is sent); `abort` reaches every worker of the route that may still hold the rid;
    `close` unsubscribes and gives back the in-flight counts."""

    def __init__(self, route: Route, wire_rid: str):
        self.route = route
        self.wire_rid = wire_rid
        self.handles: list[WorkerHandle] = [route.worker] + ([route.prefill] if route.prefill else [])
        self.first_output_seen = False  # the KV arrived (the decode worker reported a token)
        self.prefill_pending = route.prefill is not None  # the partner may still hold the rid
        self.aborted = False  # asked to abort (/abort_request): the end of the stream is D's to tell

    def send(self, req: GenerateRequest, queue: Inbox) -> None:
        """Sends to the route's workers; SendFailed (naming the worker) when one cannot take it."""
        to_worker, to_prefill = self.route.messages(req, self.wire_rid)
        self.route.worker.conn.subscribe(self.wire_rid, queue)
        try:
            self.route.worker.conn.send_nowait(to_worker)
        except WorkerUnavailable as exc:
            self.route.worker.conn.unsubscribe(self.wire_rid)
            raise SendFailed(self.route.worker, str(exc)) from None
        if self.route.prefill is None or to_prefill is None:
            return
        self.route.prefill.conn.subscribe(self.wire_rid, PrefillSide(queue))  # type: ignore[arg-type]
        try:
            self.route.prefill.conn.send_nowait(to_prefill)
        except WorkerUnavailable as exc:
            self.route.prefill.conn.unsubscribe(self.wire_rid)
            self.route.worker.conn.unsubscribe(self.wire_rid)
            self.route.worker.conn.send_abort(self.wire_rid, "Its prefill partner is unavailable.")
            raise SendFailed(self.route.prefill, str(exc)) from None

    def prefill_event(self, item: Any) -> str | None:
        """Why the pair failed, given the prefill side's item, or None (the attempt goes on)."""
        self.prefill_pending = False
        prefill = self.route.prefill
        assert prefill is not None
        if isinstance(item, PrefillDone):
            if item.ok:
                prefill.breaker.record_success()
                return None
            reason = f"prefill worker {prefill.worker_id}: {item.reason}"
        else:
            reason = item.reason
        # after the first token the KV had arrived: the prefill side's end no longer matters
        return None if self.first_output_seen or self.aborted else reason

    def abort(self, message: str) -> None:
        self.route.worker.conn.send_abort(self.wire_rid, message)
        if self.route.prefill is not None and self.prefill_pending:
            self.route.prefill.conn.send_abort(self.wire_rid, message)

    def close(self) -> None:
        """After the attempt ran (it was counted in flight on each of its workers)."""
        for handle in self.handles:
            handle.conn.unsubscribe(self.wire_rid)
            handle.inflight -= 1


class Deadline:
    """The request's timer: when it fires, TIMEOUT goes into the queue of the current attempt."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.passed = False
        self._queue: Inbox | None = None
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._fire) if timeout_s else None

    @property
    def message(self) -> str:
        return f"The request timed out after {self.timeout_s:g} s (--request-timeout)."

    def new_queue(self) -> Inbox:
        self._queue = Inbox()
        return self._queue

    def _fire(self) -> None:
        self.passed = True
        if self._queue is not None:
            self._queue.put_nowait(TIMEOUT)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
