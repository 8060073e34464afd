"""Sending one request to a worker and following its outputs, with retries, timeouts and aborts.

    async with contextlib.aclosing(dispatcher.run(req, num_samples=n)) as outputs:
        async for item in outputs:          # RequestOutput, or RESTART (restartable runs only)
            ...

Rules:
- a worker failure is: the connection drops, the worker leaves the pool, the pool finds it
  stalled (liveness), it cannot take the message, or it ends the request with a server-side
  abort (shutting down, internal error). Each failure is recorded on the worker's circuit breaker;
  a request it refused as invalid is not (that is the client's fault: GenerationError 400);
- after a failure the request goes to another worker not yet tried, up to `max_attempts` workers,
  as long as nothing of it was yielded yet; with `restartable=True` (the consumer shows nothing
  before the end) also after outputs were yielded: RESTART is yielded first and the consumer
  starts over;
- once outputs were yielded (and not restartable), a failure ends the unfinished samples with
  finish_reason {"type": "abort", "message": ..., "status_code": 503};
- `request_timeout_s` bounds the whole request: the worker gets an AbortRequest and the caller a
  GenerationError 504 (nothing yielded yet) or abort finish reasons with status_code 504;
- if the consumer stops early (client disconnect: CancelledError, or aclose: GeneratorExit) while
  samples are unfinished, the worker gets an AbortRequest, so its pages are freed;
- a rid is unique among the requests in flight through this router (400 otherwise): outputs are
  routed by rid.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from pdserve.router.generation import GenerationError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.worker_conn import StreamFailure, WorkerUnavailable
from pdserve.router.worker_pool import NoWorkerAvailable, WorkerHandle, WorkerPool
from pdserve.shared.protocol import GenerateRequest, RequestOutput

logger = logging.getLogger(__name__)

# The worker's words for server-side aborts (shared/worker/mixed.py, shared/engine/engine.py).
WORKER_SHUTDOWN_MESSAGE = "worker is shutting down"
INTERNAL_ERROR_PREFIX = "Internal error"

RESTART = object()  # yielded by restartable runs before the outputs of a new attempt
_TIMEOUT = object()  # put into the request's queue by its deadline timer

CLIENT_ABORT_MESSAGE = "The router stopped the request (its client left, or stop strings ended it)."


def server_failure(out: RequestOutput) -> str | None:
    """Why this finished output is the worker's failure, or None (a normal end, or a client error)."""
    if not out.finished or not out.finish_reason or out.finish_reason.get("type") != "abort":
        return None
    message = str(out.finish_reason.get("message") or out.error or "")
    if message == WORKER_SHUTDOWN_MESSAGE or message.startswith(INTERNAL_ERROR_PREFIX):
        return message
    return None


def abort_output(rid: str, index: int, message: str, status_code: int) -> RequestOutput:
    return RequestOutput(
        rid=rid,
        token_ids=[],
        index=index,
        finished=True,
        finish_reason={"type": "abort", "message": message, "status_code": status_code},
    )


class Dispatcher:
    def __init__(
        self,
        pool: WorkerPool,
        max_attempts: int = 3,
        request_timeout_s: float | None = None,
        metrics: RouterMetrics | None = None,
    ):
        self.pool = pool
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.request_timeout_s = request_timeout_s
        self._active: dict[str, WorkerHandle | None] = {}  # rid -> the worker running it now

    @property
    def num_active(self) -> int:
        return len(self._active)

    def active_rids(self) -> list[str]:
        return list(self._active)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> bool:
        """Asks the worker running rid to abort it (its stream then ends with an abort output)."""
        handle = self._active.get(rid)
        if handle is None:
            return False
        handle.conn.send_abort(rid, message)
        return True

    async def run(
        self, req: GenerateRequest, num_samples: int = 1, restartable: bool = False
    ) -> AsyncIterator[Any]:
        if req.rid in self._active:
            raise GenerationError(
                400, f"Duplicate request id {req.rid!r}: a request with this rid is running."
            )
        self._active[req.rid] = None
        deadline = _Deadline(self.request_timeout_s)
        tried: set[str] = set()
        yielded = False
        last_failure = ""
        try:
            while True:
                if deadline.passed:
                    raise GenerationError(504, deadline.message, "TimeoutError")
                handle = self._pick(req, tried, last_failure)
                tried.add(handle.worker_id)
                queue = deadline.new_queue()  # per attempt: late outputs of an abandoned one stay out
                handle.conn.subscribe(req.rid, queue)
                try:
                    handle.conn.send_nowait(req)
                except WorkerUnavailable as exc:
                    handle.conn.unsubscribe(req.rid)
                    self._record_failure(handle)
                    last_failure = str(exc)
                    continue
                self._active[req.rid] = handle
                handle.inflight += 1
                self.pool.policy.on_dispatched(handle.worker_id, req.input_ids)
                unfinished = set(range(num_samples))
                failure: str | None = None
                try:
                    while unfinished:
                        item = await queue.get()
                        if item is _TIMEOUT:
                            handle.conn.send_abort(req.rid, "The request timed out.")
                            if not yielded or restartable:
                                raise GenerationError(504, deadline.message, "TimeoutError")
                            for index in sorted(unfinished):
                                yield abort_output(req.rid, index, deadline.message, 504)
                            return
                        if isinstance(item, StreamFailure):
                            failure = item.reason
                            break
                        out: RequestOutput = item
                        failure = server_failure(out)
                        if failure is not None:
                            break
                        if out.error is not None and not yielded:
                            handle.breaker.record_success()  # the worker is fine; the request was not
                            raise GenerationError(400, out.error)
                        if out.finished:
                            unfinished.discard(out.index)
                            if not unfinished:  # before the last yield: the consumer may stop there
                                handle.breaker.record_success()
                        yielded = True
                        yield out
                except (asyncio.CancelledError, GeneratorExit):
                    if unfinished:
                        handle.conn.send_abort(req.rid, CLIENT_ABORT_MESSAGE)
                    raise
                finally:
                    handle.inflight -= 1
                    handle.conn.unsubscribe(req.rid)
                    self._active[req.rid] = None
                if failure is None:
                    return
                self._record_failure(handle)
                handle.conn.send_abort(req.rid, "Moved to another worker.")  # in case it is alive after all
                last_failure = failure
                logger.warning("request %s failed on worker %s: %s", req.rid, handle.worker_id, failure)
                if yielded and not restartable:
                    message = f"Worker {handle.worker_id} failed during the request: {failure}"
                    for index in sorted(unfinished):
                        yield abort_output(req.rid, index, message, 503)
                    return
                if yielded:
                    yielded = False
                    yield RESTART
        finally:
            deadline.cancel()
            self._active.pop(req.rid, None)

    def _record_failure(self, handle: WorkerHandle) -> None:
        handle.breaker.record_failure()
        if self.metrics is not None:
            self.metrics.worker_failures.labels(handle.worker_id).inc()

    def _pick(self, req: GenerateRequest, tried: set[str], last_failure: str) -> WorkerHandle:
        """The next worker to try (after the first, a retry); GenerationError 503 when none is left."""
        if len(tried) >= self.max_attempts:
            raise GenerationError(
                503, f"The request failed on {len(tried)} worker(s); last error: {last_failure}"
            )
        try:
            handle = self.pool.pick(req.input_ids, exclude=tried)
        except NoWorkerAvailable as exc:
            if tried:
                raise GenerationError(
                    503, f"The request failed on {len(tried)} worker(s); last error: {last_failure}. {exc}"
                ) from None
            raise GenerationError(503, str(exc)) from None
        if tried and self.metrics is not None:
            self.metrics.retries.inc()
        return handle


class _Deadline:
    """The request's timer: when it fires, _TIMEOUT goes into the queue of the current attempt."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.passed = False
        self._queue: asyncio.Queue | None = None
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._fire) if timeout_s else None

    @property
    def message(self) -> str:
        return f"The request timed out after {self.timeout_s:g} s (--request-timeout)."

    def new_queue(self) -> asyncio.Queue:
        self._queue = asyncio.Queue()
        return self._queue

    def _fire(self) -> None:
        self.passed = True
        if self._queue is not None:
            self._queue.put_nowait(_TIMEOUT)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
