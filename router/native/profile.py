"""`/start_profile` and `/stop_profile` (GET or POST): torch profiler traces on every worker.

    curl -X POST localhost:30000/start_profile -d '{"output_dir": "/tmp/traces", "num_steps": 20}'
    curl -X POST localhost:30000/stop_profile

Rules (SGLang's ProfileReqInput; each worker does what SGLang's TP ranks do, shared/worker/profiler.py):
- start (optional body): `output_dir` (default: the worker's $SGLANG_TORCH_PROFILER_DIR, else
  /tmp; a directory on the workers' host), `num_steps` (the trace stops by itself after that many
  engine steps), `activities` ("CPU", "GPU"), `with_stack`, `record_shapes`. Every worker writes
  `<output_dir>/<profile id>-<worker>.trace.json.gz` (a Chrome trace) when it stops; the profile id
  is the start's time, one for all workers. SGLang's `start_step` and `profile_by_stage` are
  refused (400): pdserve profiles from the start on, all stages together.
- start answers SGLang's "Start profiling.\\n"; when a worker refuses (a trace already runs there,
  an output_dir that cannot be made) the workers that did start stop again and the answer is a 400
  naming the refusals.
- stop answers "Stop profiling. Traces saved to:" and the files, one a line, once every worker
  wrote its trace; a worker with no trace running makes it a 400 naming it (the others' traces are
  written and named).
Both need the admin key when one is set (router/native/fanout.py).
"""

from __future__ import annotations

import time

from aiohttp import web

from pdserve.router.http.limits import http_error
from pdserve.router.native.fanout import (
    ask_each,
    connected_workers,
    describe,
    failures,
    field,
    read_optional_object,
)
from pdserve.router.state import STATE_KEY
from pdserve.shared.protocol import AdminReply, StartProfile, StopProfile

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 300.0  # writing a long trace with stacks takes a while
ACTIVITIES = ("CPU", "GPU")


def _start_message(body: dict) -> StartProfile:
    if field(body, "start_step", int) is not None:
        raise http_error(400, "start_step is not supported by pdserve: profiling starts at once.")
    if field(body, "profile_by_stage", bool, False):
        raise http_error(400, "profile_by_stage is not supported by pdserve: one trace covers every stage.")
    num_steps = field(body, "num_steps", int)
    if num_steps is not None and num_steps < 1:
        raise http_error(400, f"num_steps must be >= 1, got {num_steps}.")
    activities = field(body, "activities", list)
    if activities is not None:
        unknown = [a for a in activities if a not in ACTIVITIES]
        if unknown or not activities:
            raise http_error(
                400,
                f"activities must be a non-empty list of {list(ACTIVITIES)} (pdserve does not profile {unknown}).",
            )
    output_dir = field(body, "output_dir", str)
    return StartProfile(
        profile_id=f"{time.time():.6f}",
        output_dir=output_dir or None,
        num_steps=num_steps,
        activities=activities,
        with_stack=field(body, "with_stack", bool),
        record_shapes=field(body, "record_shapes", bool),
    )


async def handle_start_profile(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    template = _start_message(await read_optional_object(request))
    handles = connected_workers(state)
    answers = await ask_each(handles, lambda: StartProfile(**template.to_wire()), AdminReply, START_TIMEOUT_S)
    failed = failures(answers)
    if failed:
        started = [h for h, reply in answers if not isinstance(reply, str) and reply.success]
        await ask_each(started, StopProfile, AdminReply, STOP_TIMEOUT_S)  # all or none
        raise http_error(400, f"Profiling did not start on every worker ({describe(failed)}).")
    return web.Response(text="Start profiling.\n")


async def handle_stop_profile(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    await read_optional_object(request)
    answers = await ask_each(connected_workers(state), StopProfile, AdminReply, STOP_TIMEOUT_S)
    written = [reply.message for _, reply in answers if not isinstance(reply, str) and reply.success]
    failed = failures(answers)
    if failed:
        saved = f" Traces saved: {', '.join(written)}." if written else ""
        raise http_error(400, f"Profiling not stopped on every worker ({describe(failed)}).{saved}")
    return web.Response(text="Stop profiling. Traces saved to:\n" + "".join(f"{p}\n" for p in written))


def add_profile_routes(app: web.Application) -> None:
    for path, handler in (("/start_profile", handle_start_profile), ("/stop_profile", handle_stop_profile)):
        app.router.add_route("GET", path, handler)
        app.router.add_route("POST", path, handler)
