"""SGLang's run-time switches: `/freeze_gc`, `/set_internal_state`, `/configure_logging`.

    curl -X POST localhost:30000/freeze_gc
    curl -X POST localhost:30000/set_internal_state -d '{"server_args": {"max_micro_batch_size": 8}}'

Rules:
- `/freeze_gc` (GET or POST): the router and every worker collect once, then `gc.freeze()`: the
  objects alive now (model, pools, tokenizer) move to the permanent generation and are never
  scanned again, so later collections are short (SGLang's reason for the route). 200 with SGLang's
  "Garbage collection frozen.\\n", then one line per process with its frozen object count; a worker
  that does not answer makes it a 400 naming it.
- `/set_internal_state` (POST or PUT, {"server_args": {...}}): SGLang changes only
  `max_micro_batch_size` (pipeline parallelism) and `speculative_accept_threshold_single` /
  `_acc` (speculative decoding) at run time. pdserve has neither, so any key is a 400 naming it;
  an empty object changes nothing and answers SGLang's {"updated": true, "server_args": {...}}
  with the router's arguments.
- `/configure_logging` (GET or POST, SGLang's ConfigureLoggingReq): `log_requests` switches the
  router's request log (`router --log-requests`, router/serving/request_metrics.py: one `Finish:` line per
  request) on or off at run time; 200 with an empty body, as SGLang answers. That log has one
  level, SGLang's 0 (metadata: rid, token counts, latency, finish reason; no text), so
  `log_requests_level` other than 0 is a 400, and so are the request dumps pdserve does not write
  (`dump_requests_folder`, `dump_requests_threshold`, `crash_dump_folder`). With `--processes N`
  the switch is the one router process's that took the request.
Every route here needs the admin key when one is set (router/native/fanout.py).
"""

from __future__ import annotations

import gc

from aiohttp import web

from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.native.fanout import (
    ask_each,
    connected_workers,
    describe,
    failures,
    field,
    read_optional_object,
)
from pdserve.router.serving.request_metrics import RequestLog
from pdserve.router.serving.request_metrics import logger as request_logger
from pdserve.router.state import STATE_KEY, RouterState
from pdserve.shared.protocol import AdminReply, FreezeGC

GC_TIMEOUT_S = 60.0  # a full collection of a big heap takes seconds
SGLANG_INTERNAL_STATE = {
    "max_micro_batch_size": "pipeline parallelism",
    "speculative_accept_threshold_single": "speculative decoding",
    "speculative_accept_threshold_acc": "speculative decoding",
}


async def handle_freeze_gc(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    await read_optional_object(request)
    answers = await ask_each(connected_workers(state), FreezeGC, AdminReply, GC_TIMEOUT_S)
    failed = failures(answers)
    if failed:
        raise http_error(400, f"Garbage collection not frozen on every worker ({describe(failed)}).")
    gc.collect()
    gc.freeze()
    lines = [f"router: {gc.get_freeze_count()} objects frozen"]
    lines += [f"{h.worker_id}: {reply.message} objects frozen" for h, reply in answers]
    return web.Response(text="Garbage collection frozen.\n" + "".join(f"{line}\n" for line in lines))


async def handle_set_internal_state(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    server_args = body.get("server_args")
    if not isinstance(server_args, dict):
        raise http_error(400, "server_args must be an object of the arguments to change.")
    if server_args:
        key = next(iter(server_args))
        feature = SGLANG_INTERNAL_STATE.get(key)
        why = (
            f"it tunes {feature}, which pdserve does not have"
            if feature is not None
            else f"only {', '.join(SGLANG_INTERNAL_STATE)} can change at run time (SGLang's rule), "
            "and pdserve has none of them"
        )
        raise http_error(400, f"/set_internal_state: updating {key} is not supported: {why}.")
    return web.json_response({"updated": True, "server_args": state.args.to_public_dict()})


async def handle_configure_logging(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_optional_object(request)
    for name in ("dump_requests_folder", "dump_requests_threshold", "crash_dump_folder"):
        if body.get(name) is not None:
            raise http_error(
                400, f"/configure_logging: {name} is not supported: pdserve writes no request dumps."
            )
    level = field(body, "log_requests_level", int)
    if level is not None and level != 0:
        raise http_error(
            400,
            f"/configure_logging: log_requests_level {level} is not supported: pdserve's request log has "
            "one level, SGLang's 0 (rid, token counts, latency, finish reason; no request or output text).",
        )
    log_requests = field(body, "log_requests", bool)
    if log_requests is not None:
        set_request_log(state, log_requests)
    return web.Response(status=200)


def set_request_log(state: RouterState, on: bool) -> None:
    """The request log on (wrapping the generator the first time) or off (its logger silenced)."""
    if on and not isinstance(state.generator, RequestLog):
        state.generator = RequestLog(state.generator)
    request_logger.disabled = not on


def add_runtime_routes(app: web.Application) -> None:
    r = app.router
    for method in ("GET", "POST"):
        r.add_route(method, "/freeze_gc", handle_freeze_gc)
        r.add_route(method, "/configure_logging", handle_configure_logging)
    for method in ("POST", "PUT"):
        r.add_route(method, "/set_internal_state", handle_set_internal_state)
