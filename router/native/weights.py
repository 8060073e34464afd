"""SGLang's weight routes for RL loops: version labels, new values from tensors, a parameter read-out.

    GET  /get_weight_version                -> {"weight_version": "default"}
    POST /update_weight_version              {"new_version": "step-7", "abort_all_requests": true}
    POST /update_weights_from_tensor         {"serialized_named_tensors": [<base64 pickle>], "flush_cache": true,
                                              "load_format": null, "abort_all_requests": false, "weight_version": null}
    GET|POST /get_weights_by_name            {"name": "model.norm.weight", "truncate_size": 100}

Rules (bodies and answers as SGLang 0.5.3 has them):
- `/update_weight_version` relabels the weights on every worker (no values change):
  `/get_weight_version`, `/get_model_info`, `/get_server_info` and each response's
  `meta_info.weight_version` show it. `abort_all_requests` (default true) aborts what runs first.
  200 {"success": true, "message": "Weight version updated to <v>", "new_version": <v>}.
- `/update_weights_from_tensor` sends `serialized_named_tensors` to every worker, which needs one
  entry per tensor-parallel rank (entry r for rank r, as SGLang's scheduler reads it; another
  count is a 400 from the worker; shared/engine/tp_tensor_updates.py). An entry is
  SGLang's ForkingPickler pickle of (name, tensor) pairs, read without running code
  (shared/engine/tensor_payload.py): the tensors stay in the sender's shared memory (CPU, with the
  "file_system" sharing strategy) or GPU (CUDA IPC), so the sender runs on the workers' host and
  keeps them alive until the answer. Each worker checks every tensor against its parameters, lets
  running requests finish (as `/update_weights_from_disk` does; `abort_all_requests` aborts them
  instead), copies all in, flushes its prefix cache unless `flush_cache` is false, and moves its
  weight_version (`weight_version` when given). 200 {"success": true, "message": "Success"} or 400
  with the workers' reasons (a partial update says how many workers took it).
- `/get_weights_by_name` reads a parameter on one worker: by checkpoint (Hugging Face) name or the
  model's own name; the answer is the first `truncate_size` rows as float lists (SGLang's truncated
  parameter; on a tensor-parallel worker the whole parameter's rows, gathered from its ranks); an
  unknown name is a 400.
All but `/get_weight_version` need the admin key when one is set (router/native/fanout.py).
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.native.admin import update_weights_everywhere
from pdserve.router.native.fanout import (
    ask_each,
    ask_one,
    connected_workers,
    describe,
    failures,
    field,
    read_optional_object,
)
from pdserve.router.native.sibling_abort import SIBLINGS_KEY, abort_here
from pdserve.router.state import STATE_KEY, RouterState
from pdserve.shared.protocol import (
    AdminReply,
    GetWeightsByName,
    UpdateWeightsFromTensor,
    UpdateWeightVersion,
    WeightsByName,
)

VERSION_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 60.0
MAX_TRUNCATE_SIZE = 100_000  # rows of one read-out; a whole large matrix is not an answer
TENSOR_LOAD_FORMATS = ("direct", "auto")  # and null


async def _abort_everything(request: web.Request, state: RouterState) -> None:
    abort_here(state, None, True)
    siblings = request.app.get(SIBLINGS_KEY)
    if siblings is not None:  # with --processes N: the other processes' requests too
        await siblings.abort(None, True)


async def handle_get_weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[STATE_KEY].weight_version})


async def handle_update_weight_version(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    new_version = field(body, "new_version", str)
    if not new_version:
        raise http_error(400, "new_version must be a non-empty string.")
    handles = connected_workers(state)
    if field(body, "abort_all_requests", bool, True):
        await _abort_everything(request, state)
    answers = await ask_each(
        handles, lambda: UpdateWeightVersion(new_version=new_version), AdminReply, VERSION_TIMEOUT_S
    )
    failed = failures(answers)
    await state.pool.refresh_server_info()  # each worker's entry in /get_server_info tells the truth
    if failed:
        message = f"Failed to update weight version on every worker ({describe(failed)})."
        return web.json_response({"success": False, "message": message}, status=400)
    if state.facts is not None:
        state.facts.weight_version = new_version
    return web.json_response(
        {"success": True, "message": f"Weight version updated to {new_version}", "new_version": new_version}
    )


async def handle_update_weights_from_tensor(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    entries = field(body, "serialized_named_tensors", list)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise http_error(400, "serialized_named_tensors must be a non-empty list of base64 strings.")
    load_format = field(body, "load_format", str)
    if load_format is not None and load_format not in TENSOR_LOAD_FORMATS:
        raise http_error(
            400,
            f'load_format {load_format!r} is not supported: use null (checkpoint names) or "direct" '
            "(the model's parameter names).",
        )
    flush_cache = field(body, "flush_cache", bool, True)
    weight_version = field(body, "weight_version", str)
    handles = connected_workers(state)
    if field(body, "abort_all_requests", bool, False):
        await _abort_everything(request, state)
    msg = UpdateWeightsFromTensor(
        serialized_named_tensors=entries,  # each worker takes entry r for its rank r
        load_format=load_format,
        flush_cache=flush_cache,
        weight_version=weight_version,
    )
    success, message = await update_weights_everywhere(state, handles, msg)
    if success and weight_version is not None:
        message += f" Weight version updated to {weight_version}."
    return web.json_response({"success": success, "message": message}, status=200 if success else 400)


async def handle_get_weights_by_name(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await read_optional_object(request)
    name = field(body, "name", str)
    if not name:
        raise http_error(400, "name must be a non-empty string (a parameter's name).")
    truncate_size = field(body, "truncate_size", int, 100)
    if not 1 <= truncate_size <= MAX_TRUNCATE_SIZE:
        raise http_error(400, f"truncate_size must be in [1, {MAX_TRUNCATE_SIZE}], got {truncate_size}.")
    worker = connected_workers(state)[0]  # every worker holds the same weights
    reply = await ask_one(
        worker, GetWeightsByName(name=name, truncate_size=truncate_size), WeightsByName, READ_TIMEOUT_S
    )
    if isinstance(reply, str):
        raise http_error(503, f"Worker {worker.worker_id} gave no parameter: {reply}.")
    if not reply.success:
        raise http_error(400, f"Get parameter by name failed: {reply.message}")
    return web.json_response(reply.parameter)


def add_weight_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/get_weight_version", handle_get_weight_version)
    r.add_post("/update_weight_version", handle_update_weight_version)
    r.add_post("/update_weights_from_tensor", handle_update_weights_from_tensor)
    r.add_route("GET", "/get_weights_by_name", handle_get_weights_by_name)
    r.add_route("POST", "/get_weights_by_name", handle_get_weights_by_name)
