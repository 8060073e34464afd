"""Sending one request to a worker (or a prefill/decode pair) and following its outputs, with
retries, timeouts and aborts.

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
- once outputs were yielded (and not restartable), a failed request with one sample moves
  (migration, unless `migrate=False`): another worker not yet tried gets the prompt plus the tokens
  generated so far (`GenerateRequest.generated_ids`; it prefills them locally, the prefix cache
  making that cheap, counts them as its own output for max/min_new_tokens, penalties and seeds, and
  streams only what comes after), so the stream goes on without a gap and greedy output equals an
  undisturbed run; moves count as attempts. With n > 1 each unfinished sample moves as its own
  one-sample request (router/serving/sample_moves.py); with migration off the unfinished samples
  end with finish_reason {"type": "abort", "message": ..., "status_code": 503};
- `request_timeout_s` bounds the whole request: the worker gets an AbortRequest and the caller a
  GenerationError 504 (nothing yielded yet) or abort finish reasons with status_code 504;
- if the consumer stops early (client disconnect: CancelledError, or aclose: GeneratorExit) while
  samples are unfinished, the worker gets an AbortRequest, so its pages are freed;
- with `inline`, the unfinished outputs of a stream that has begun go to the consumer where they
  arrive (router/serving/inbox.py), with the same bookkeeping as yielded ones; everything else is yielded;
- a rid is unique among the requests in flight through this router (400 otherwise): outputs are
  routed by rid. A retry carries `<rid>~retryN` on the workers (a worker of an abandoned attempt
  may still hold the rid); outputs are yielded with the request's own rid.

Pairs (router/cluster/pairing.py chooses each attempt's route): the decode worker D gets a DecodeRequest
and the prefill worker P a PrefillRequest, in that order, with the same rid; tokens stream from D,
P answers one PrefillDone. Before D's first token, a pair fails when P answers PrefillDone(ok=False)
or its connection drops, or D ends the request with "KV transfer failed: ..." (P is blamed: the
retry takes another P, or local prefill at D when none is left) or D fails as above (D is blamed);
the partner gets an AbortRequest at once, so neither side holds the request. After D's first
token the KV is in D: P's end no longer matters. A client that leaves aborts the rid on D and, if
P has not answered yet, on P.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Collection
from typing import Any

from pdserve.router.cluster.pairing import Pairing, Route, Tried
from pdserve.router.cluster.worker_conn import StreamFailure
from pdserve.router.cluster.worker_pool import NoWorkerAvailable, WorkerHandle, WorkerPool
from pdserve.router.serving.attempt import TIMEOUT, Attempt, Deadline, FromPrefill, SendFailed
from pdserve.router.serving.generator_api import GenerationError
from pdserve.router.serving.metrics import RouterMetrics
from pdserve.router.serving.sample_moves import move_samples
from pdserve.shared.protocol import GenerateRequest, RequestOutput

logger = logging.getLogger(__name__)

# The worker's words for server-side aborts (shared/worker/mixed.py, shared/engine/engine.py).
WORKER_SHUTDOWN_MESSAGE = "worker is shutting down"
INTERNAL_ERROR_PREFIX = "Internal error"
TRANSFER_FAILED_PREFIX = "KV transfer failed"  # decode/decode_engine.py: the prefill side's KV never came

RESTART = object()  # yielded by restartable runs before the outputs of a new attempt

CLIENT_ABORT_MESSAGE = "The router stopped the request (its client left, or stop strings ended it)."


def server_failure(out: RequestOutput) -> str | None:
    """Why this finished output is the worker's failure, or None (a normal end, or a client error)."""
    if not out.finished or not out.finish_reason or out.finish_reason.get("type") != "abort":
        return None
    message = str(out.finish_reason.get("message") or out.error or "")
    if message == WORKER_SHUTDOWN_MESSAGE or message.startswith(INTERNAL_ERROR_PREFIX):
        return message
    return None


def transfer_failure(out: RequestOutput) -> str | None:
    """Why a decode worker ended a paired request before its first token: its KV never came, or None."""
    if not out.finished or not out.finish_reason or out.finish_reason.get("type") != "abort":
        return None
    message = str(out.finish_reason.get("message") or out.error or "")
    return message if message.startswith(TRANSFER_FAILED_PREFIX) else None


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
        pairing: Pairing | None = None,
        migrate: bool = True,
    ):
        self.pool = pool
        self.migrate = migrate
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.request_timeout_s = request_timeout_s
        self.pairing = pairing or Pairing(pool, pool.policy, pool.policy)
        self._active: dict[str, Attempt | None] = {}  # rid -> its attempt running now
        self.moved: dict[str, list[str]] = {}  # rid of an n > 1 request -> its moved samples' rids

    @property
    def num_active(self) -> int:
        return len(self._active)

    def active_rids(self) -> list[str]:
        return list(self._active)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> bool:
        """Asks the workers running rid to abort it (its stream then ends with an abort output)."""
        moved = self.moved.get(rid)
        if moved is not None:
            aborted = [self.abort(sub, message) for sub in moved]  # every one, not the first
            return any(aborted)
        attempt = self._active.get(rid)
        if attempt is None:
            return False
        attempt.aborted = True  # the prefill side's answer to it is no failure to retry
        attempt.abort(message)
        return True

    async def run(
        self,
        req: GenerateRequest,
        num_samples: int = 1,
        restartable: bool = False,
        inline: Callable[[RequestOutput], bool] | None = None,
        avoid: Collection[str] = (),
    ) -> AsyncGenerator[Any, None]:
        """`inline(out)`: the consumer takes an ordinary output at once, where it arrives (True),
        or declines with no side effect (False: it is yielded); router/serving/inbox.py says why.
        `avoid`: workers not to try (a moved sample's failed worker)."""
        if req.rid in self._active:
            raise GenerationError(
                400, f"Duplicate request id {req.rid!r}: a request with this rid is running."
            )
        self._active[req.rid] = None
        deadline = Deadline(self.request_timeout_s)
        tried = Tried()
        tried.workers.update(avoid)
        yielded = False
        last_failure = ""
        sent = req  # what the attempts send: req, or req with the tokens generated so far (a move)
        generated: dict[int, list[int]] = {}  # each sample's tokens yielded so far (what a move carries)
        may_move = self.migrate
        unfinished = set(range(num_samples))

        def as_yielded(out: RequestOutput) -> RequestOutput:
            """`out` as the consumer sees it: the request's own rid, no prompt logprobs twice."""
            if out.rid != req.rid:
                out.rid = req.rid
            if sent is not req:  # a moved request: its prompt logprobs went out before
                out.input_token_logprobs = out.input_top_logprobs = None
                out.input_token_ids_logprobs = None
            return out

        def take_inline(item: Any) -> bool:
            # only what the loop below would yield with no other effect: an unfinished output of a
            # stream that has begun (its first output, finishes, errors and failures go the loop's way)
            if type(item) is not RequestOutput or item.finished or item.error is not None or not yielded:
                return False
            if not attempt.first_output_seen or inline is None or not inline(as_yielded(item)):
                return False
            if may_move:
                generated.setdefault(item.index, []).extend(item.token_ids)
            return True

        try:
            while True:
                if deadline.passed:
                    raise GenerationError(504, deadline.message, "TimeoutError")
                try:
                    route = self._route(sent, num_samples, tried, last_failure)
                except GenerationError as exc:
                    if not yielded:
                        raise
                    message = f"The request could not move to another worker: {exc.message}"
                    for index in sorted(unfinished):
                        yield abort_output(req.rid, index, message, exc.status)
                    return
                tried.attempts += 1
                tried.workers.add(route.worker.worker_id)
                # a retry gets its own rid on the workers: a worker of the last attempt may still hold it
                wire_rid = req.rid if tried.attempts == 1 else f"{req.rid}~retry{tried.attempts - 1}"
                queue = deadline.new_queue()  # per attempt: late outputs of an abandoned one stay out
                attempt = Attempt(route, wire_rid)
                if inline is not None:
                    queue.inline = take_inline
                try:
                    attempt.send(sent, queue)
                except SendFailed as exc:
                    self._record_failure(exc.handle)
                    self._exclude(tried, route, exc.handle)
                    last_failure = exc.reason
                    continue
                self._active[req.rid] = attempt
                for handle in attempt.handles:
                    handle.inflight += 1
                self.pool.policy.on_dispatched(route.worker.worker_id, req.input_ids)
                if route.prefill is not None:
                    self.pairing.prefill_policy.on_dispatched(route.prefill.worker_id, req.input_ids)
                if not yielded:
                    unfinished = set(range(num_samples))
                failed: WorkerHandle | None = None
                failure = ""
                try:
                    while unfinished:
                        item = await queue.get()
                        if item is TIMEOUT:
                            attempt.abort("The request timed out.")
                            if not yielded or restartable:
                                raise GenerationError(504, deadline.message, "TimeoutError")
                            for index in sorted(unfinished):
                                yield abort_output(req.rid, index, deadline.message, 504)
                            return
                        if isinstance(item, FromPrefill):
                            reason = attempt.prefill_event(item.item)
                            if reason is None:
                                continue
                            failed, failure = route.prefill, reason
                            break
                        if isinstance(item, StreamFailure):
                            failed, failure = route.worker, item.reason
                            break
                        out: RequestOutput = item
                        failure = server_failure(out) or ""
                        if failure:
                            failed = route.worker
                            break
                        if route.prefill is not None and not attempt.first_output_seen:
                            failure = transfer_failure(out) or ""
                            if failure:  # the KV never came: the prefill side's fault, as a rule
                                failed = route.prefill
                                break
                        attempt.first_output_seen = True
                        if out.error is not None and not yielded:
                            route.worker.breaker.record_success()  # the worker is fine; the request was not
                            raise GenerationError(400, out.error)
                        if out.finished:
                            unfinished.discard(out.index)
                            if not unfinished:  # before the last yield: the consumer may stop there
                                route.worker.breaker.record_success()
                        yielded = True
                        if may_move:
                            generated.setdefault(out.index, []).extend(out.token_ids)
                        yield as_yielded(out)
                except BaseException as exc:
                    # the client left (cancelled, closed), or the consumer failed on an inline output
                    if unfinished and not isinstance(exc, GenerationError):  # (those ended it already)
                        attempt.abort(CLIENT_ABORT_MESSAGE)
                    raise
                finally:
                    queue.inline = None
                    attempt.close()
                    self._active[req.rid] = None
                if failed is None:
                    return
                self._record_failure(failed)
                self._exclude(tried, route, failed)
                # cancels the partner, and the failed worker in case it is alive after all
                attempt.abort("Moved to another worker.")
                last_failure = failure
                logger.warning("request %s failed on worker %s: %s", req.rid, failed.worker_id, failure)
                if yielded and not restartable:
                    if may_move and num_samples > 1:
                        if self.metrics is not None:
                            self.metrics.migrations.inc(len(unfinished))
                        logger.info("request %s: %d sample(s) move on", req.rid, len(unfinished))
                        moving = {i: generated.get(i, []) for i in unfinished}
                        async with contextlib.aclosing(
                            move_samples(self, req, moving, tried.workers, abort_output)
                        ) as moved:
                            async for out in moved:
                                yield out
                        return
                    if may_move:
                        sent = dataclasses.replace(req, generated_ids=list(generated.get(0, [])))
                        if self.metrics is not None:
                            self.metrics.migrations.inc()
                        logger.info("request %s moves on with %d generated token(s)", req.rid, len(generated))
                        continue
                    message = f"Worker {failed.worker_id} failed during the request: {failure}"
                    for index in sorted(unfinished):
                        yield abort_output(req.rid, index, message, 503)
                    return
                if yielded:
                    yielded = False
                    yield RESTART
        finally:
            deadline.cancel()
            self._active.pop(req.rid, None)

    @staticmethod
    def _exclude(tried: Tried, route: Route, failed: WorkerHandle) -> None:
        """A failed prefill partner is not tried again; the streaming worker is, with another partner."""
        if failed is route.prefill:
            tried.prefill.add(failed.worker_id)
            tried.workers.discard(route.worker.worker_id)
        else:
            tried.workers.add(failed.worker_id)

    def _record_failure(self, handle: WorkerHandle) -> None:
        handle.breaker.record_failure()
        if self.metrics is not None:
            self.metrics.worker_failures.labels(handle.worker_id).inc()

    def _route(self, req: GenerateRequest, num_samples: int, tried: Tried, last_failure: str) -> Route:
        """The next attempt's route (after the first, a retry); GenerationError 503 when none is left."""
        if tried.attempts >= self.max_attempts:
            raise GenerationError(
                503, f"The request failed on {tried.attempts} attempt(s); last error: {last_failure}"
            )
        try:
            # a moved request prefills its tokens where it streams from: no transfer of its KV
            route = self.pairing.route(req.input_ids, num_samples, tried, local=bool(req.generated_ids))
        except NoWorkerAvailable as exc:
            if tried.attempts:
                raise GenerationError(
                    503,
                    f"The request failed on {tried.attempts} attempt(s); last error: {last_failure}. {exc}",
                ) from None
            raise GenerationError(503, str(exc)) from None
        if tried.attempts and self.metrics is not None:
            self.metrics.retries.inc()
        return route
