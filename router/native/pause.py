"""`/pause_generation` and `/continue_generation` (POST): stop and resume every worker's scheduling.

    curl -X POST localhost:30000/pause_generation -d '{"mode": "in_place"}'
    curl -X POST localhost:30000/continue_generation

Rules:
- pause (optional body {"mode"}): every connected worker stops scheduling; requests that arrive
  meanwhile wait on the workers, in arrival order, and run after continue. `mode` "abort" (the
  default, SGLang's behaviour) first aborts the running and queued requests (their clients get
  finish_reason abort, as with /abort_request); "in_place" keeps them where they are: they hold
  their KV pages and go on, token for token as if never paused, after continue. SGLang's
  "retract" mode is refused (400): pdserve keeps paused requests in place instead.
- continue: every connected worker resumes; held requests enter in arrival order.
- the answers are SGLang's: 200 {"message": "Generation paused successfully.", "status": "ok"}
  (and "...continued..."); a worker that did not pause (or continue) makes it a 400 naming it.
- while paused, `/update_weights_from_disk` and `/update_weights_from_tensor` run at once after an
  "abort" pause (nothing to drain) and are refused after an "in_place" pause that holds requests;
  `/abort_request` aborts held and paused requests alike.
- the pause is the workers' state: a worker that joins (or restarts) later is not paused.
Both need the admin key when one is set (router/native/fanout.py).
"""

from __future__ import annotations

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
from pdserve.shared.protocol import AdminReply, ContinueGeneration, PauseGeneration

PAUSE_MODES = ("abort", "in_place")
CONTROL_TIMEOUT_S = 30.0


async def handle_pause_generation(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_optional_object(request)
    mode = field(body, "mode", str, "abort")
    if mode == "retract":
        raise http_error(
            400,
            'mode "retract" is not supported by pdserve: use "in_place" (paused requests keep their '
            'KV pages and resume where they were) or "abort".',
        )
    if mode not in PAUSE_MODES:
        raise http_error(400, f"mode must be one of {list(PAUSE_MODES)}, got {mode!r}.")
    answers = await ask_each(
        connected_workers(state), lambda: PauseGeneration(mode=mode), AdminReply, CONTROL_TIMEOUT_S
    )
    failed = failures(answers)
    if failed:
        raise http_error(400, f"Generation not paused on every worker ({describe(failed)}).")
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def handle_continue_generation(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    await read_optional_object(request)  # SGLang takes no body; a malformed one is still a 400
    answers = await ask_each(connected_workers(state), ContinueGeneration, AdminReply, CONTROL_TIMEOUT_S)
    failed = failures(answers)
    if failed:
        raise http_error(400, f"Generation not continued on every worker ({describe(failed)}).")
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


def add_pause_routes(app: web.Application) -> None:
    app.router.add_post("/pause_generation", handle_pause_generation)
    app.router.add_post("/continue_generation", handle_continue_generation)
