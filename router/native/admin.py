"""Admin routes (they take `--admin-api-key` when set): flush the cache, update weights, abort.

- `/flush_cache` (GET or POST, `?timeout=<seconds>`, default 0): every connected worker flushes its
  radix cache. A worker with requests running or queued refuses; the router retries until all
  flushed or the timeout passed, then answers 400 naming the workers that refused and why.
  Success is 200 with SGLang's text "Cache flushed.".
- `/update_weights_from_disk` (POST {"model_path", "load_format"?, "weight_version"?}; also served
  as `/update_weights`, the seeds' name, same handler and admin key): every connected worker
  reloads; `success` iff all succeeded. The message is the workers' own ("Succeeded to update
  model weights." / "Failed to get weights iterator: <path> (repository not found)."), failures
  first, de-duplicated. 200 on success, 400 on failure, like SGLang. When any worker updated (a
  partial update too) the router asks the workers for their ServerInfo again, so /get_server_info
  shows each worker's version; the router's own weight_version and model path change only on
  success.
- `/abort_request` (POST {"rid"} or {"abort_all": true}): the worker running each such request
  aborts it; its client gets finish_reason {"type": "abort", ...}. 200 with an empty body, also for
  an unknown rid (it may have just finished), as SGLang does. With `--processes N` a rid this
  process does not run (and abort_all) is passed on to its siblings before the answer
  (router/native/sibling_abort.py).
"""

from __future__ import annotations

import asyncio
import copy
import time

from aiohttp import web

from pdserve.router.cluster.worker_conn import WorkerUnavailable
from pdserve.router.cluster.worker_pool import WorkerHandle
from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.native.fanout import connected_workers
from pdserve.router.native.sibling_abort import SIBLINGS_KEY, abort_here
from pdserve.router.state import STATE_KEY, RouterState
from pdserve.shared.protocol import (
    FlushCacheRequest,
    FlushCacheResult,
    Message,
    UpdateWeightsRequest,
    UpdateWeightsResult,
)

FLUSH_QUERY_TIMEOUT_S = 10.0
FLUSH_RETRY_S = 0.1
# A worker drains running requests before swapping weights (120 s by default): wait longer.
UPDATE_WEIGHTS_TIMEOUT_S = 600.0


async def _flush_one(h: WorkerHandle) -> str | None:
    """None when flushed, else why not."""
    try:
        result = await h.conn.query(FlushCacheRequest(), FlushCacheResult, FLUSH_QUERY_TIMEOUT_S)
    except (WorkerUnavailable, TimeoutError, asyncio.TimeoutError) as exc:
        return f"no answer ({exc or 'timed out'})"
    return None if result.success else result.message


async def handle_flush_cache(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    raw = request.query.get("timeout", "0")
    try:
        timeout_s = float(raw)
    except ValueError:
        raise http_error(400, f"timeout must be a number of seconds, got {raw!r}.") from None
    if not timeout_s >= 0:  # also refuses NaN
        raise http_error(400, f"timeout must be >= 0 seconds, got {raw!r}.")
    deadline = time.monotonic() + timeout_s
    pending = connected_workers(state)
    while True:
        reasons = await asyncio.gather(*(_flush_one(h) for h in pending))
        failed = [(h, r) for h, r in zip(pending, reasons) if r is not None]
        if not failed:
            return web.Response(text="Cache flushed.\n")
        if time.monotonic() >= deadline:
            detail = "; ".join(f"{h.worker_id}: {r}" for h, r in failed)
            hint = "" if timeout_s else " Pass ?timeout=<seconds> to wait for running requests to finish."
            waited = f" after waiting {timeout_s:g} s" if timeout_s else ""
            raise http_error(400, f"Cache not flushed{waited} ({detail}).{hint}")
        pending = [h for h, _ in failed]
        await asyncio.sleep(min(FLUSH_RETRY_S, max(deadline - time.monotonic(), 0)))


async def _update_one(h: WorkerHandle, msg: Message) -> UpdateWeightsResult:
    try:
        return await h.conn.query(msg, UpdateWeightsResult, UPDATE_WEIGHTS_TIMEOUT_S)
    except (WorkerUnavailable, TimeoutError, asyncio.TimeoutError) as exc:
        return UpdateWeightsResult(
            success=False, message=f"Worker {h.worker_id} did not answer: {exc or 'timeout'}"
        )


async def handle_update_weights(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    model_path = body.get("model_path")
    if not isinstance(model_path, str) or not model_path:
        raise http_error(400, "model_path must be a non-empty string.")
    load_format, weight_version = body.get("load_format"), body.get("weight_version")
    for name, value in (("load_format", load_format), ("weight_version", weight_version)):
        if value is not None and not isinstance(value, str):
            raise http_error(400, f"{name} must be a string.")
    handles = connected_workers(state)
    msg = UpdateWeightsRequest(model_path=model_path, load_format=load_format, weight_version=weight_version)
    success, message = await update_weights_everywhere(state, handles, msg, model_path)
    return web.json_response(
        {"success": success, "message": message, "num_paused_requests": 0}, status=200 if success else 400
    )


async def update_weights_everywhere(
    state: RouterState, handles: list[WorkerHandle], msg: Message, model_path: str | None = None
) -> tuple[bool, str]:
    """Sends a weights update (from disk, or from tensors) to every worker; (success, message).

    `success` iff all succeeded; the message is the workers' own, failures first, de-duplicated.
    When any worker updated (a partial update too) the router asks the workers for their ServerInfo
    again; the router's own weight_version (and model path, when given) change only on success."""
    results = await asyncio.gather(*(_update_one(h, copy.copy(msg)) for h in handles))
    success = all(r.success for r in results)
    failures = list(dict.fromkeys(r.message for r in results if not r.success))
    successes = list(dict.fromkeys(r.message for r in results if r.success))
    updated = sum(r.success for r in results)
    if failures and 0 < updated < len(handles):  # a partial update says so; a uniform failure is verbatim
        failures.append(f"({updated} of {len(handles)} workers updated)")
    message = " ".join(failures) if failures else " ".join(successes)
    router_version = state.weight_version
    if updated:  # also after a partial update: each worker's entry in /get_server_info tells the truth
        await state.pool.refresh_server_info()
    if state.facts is not None:
        if success:
            state.facts.weight_version = results[0].weight_version
            if model_path is not None:
                state.facts.model_path = model_path
        else:  # the refresh may have taught it one worker's new version: the router's stays as it was
            state.facts.weight_version = router_version
    return success, message


async def handle_abort_request(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    rid, abort_all = body.get("rid"), body.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise http_error(400, "abort_all must be a boolean.")
    if not abort_all and not (isinstance(rid, str) and rid):
        raise http_error(400, "Give rid (a non-empty string) or abort_all: true.")
    known = abort_here(state, None if abort_all else rid, abort_all)
    siblings = request.app.get(SIBLINGS_KEY)
    if siblings is not None and (abort_all or not known):  # with --processes N: rid may run in another
        await siblings.abort(None if abort_all else rid, abort_all)
    return web.Response(status=200)
