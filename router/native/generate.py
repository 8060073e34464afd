"""`/generate` (POST and PUT): SGLang's native generation route.

Response, per sample: {"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
"completion_tokens", "cached_tokens", "weight_version", "e2e_latency", logprob fields when asked}}.
A single prompt with n == 1 answers one object; a batch (or n > 1) answers a list, prompt i's
samples at i*n .. i*n+n-1.

Streaming (`"stream": true`): SSE chunks `data: {...}`, each with the sample's cumulative `text`,
`output_ids` and `meta_info` (logprob lists cumulative too, `e2e_latency` on the last chunk), an
`index` for batches, then `data: [DONE]`. Problems found before the first chunk are plain HTTP
errors; a failure after it ends the sample with a finish_reason of type abort (or, for an error
outside any sample, an `{"error": {...}}` chunk) before [DONE].

A non-streaming sample ended by the router's timeout or by a failed worker (finish_reason abort
with a status_code) makes the whole answer that error status. Aborts asked by a client
(/abort_request) answer normally with their finish_reason, as SGLang does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pdserve.router.http.errors import error_body
from pdserve.router.http.limits import read_json_object
from pdserve.router.http.sse import EventStream, encode_event
from pdserve.router.native.parse import NativeGenerateRequest, parse_generate
from pdserve.router.native.sample_view import SampleView
from pdserve.router.serving.admission_gate import parse_priority
from pdserve.router.serving.generator_api import GenerateInput, GenerationError, SampleEvent
from pdserve.router.state import STATE_KEY, RouterState
from pdserve.shared.protocol import GenerateRequest

logger = logging.getLogger(__name__)


def _views(state: RouterState, req: NativeGenerateRequest, start: float) -> list[SampleView]:
    n = req.num_samples
    return [SampleView(inp, j, n, start, state.weight_version) for inp in req.inputs for j in range(n)]


async def handle_generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    start = time.perf_counter()
    body = await read_json_object(request)
    req = parse_generate(body, state.encoder(), state.args.max_batch_size)
    priority = parse_priority(body.get("priority"))  # one for every prompt (admission order)
    for inp in req.inputs:
        inp.priority = priority
    checked = [state.generator.check(inp) for inp in req.inputs]  # every prompt before any is sent
    views = _views(state, req, start)
    if req.stream:
        return await _stream(request, state, req, views, checked)
    return await _collect(state, req, views, checked)


async def _collect(
    state: RouterState, req: NativeGenerateRequest, views: list[SampleView], checked: list[GenerateRequest]
) -> web.Response:
    async def one(i: int, inp: GenerateInput) -> None:
        async for event in state.generator.stream(inp, buffered=True, checked=checked[i]):
            views[i * req.num_samples + event.index].update(event)

    tasks = [asyncio.ensure_future(one(i, inp)) for i, inp in enumerate(req.inputs)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one prompt failed (or the client left): the others stop too
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for view in views:
        reason = view.finish_reason or {}
        if reason.get("type") == "abort" and reason.get("status_code"):
            raise GenerationError(int(reason["status_code"]), str(reason.get("message", "aborted")))
    results = [view.to_dict() for view in views]
    return web.json_response(results if req.is_batch else results[0], dumps=_dumps)


async def _stream(
    request: web.Request,
    state: RouterState,
    req: NativeGenerateRequest,
    views: list[SampleView],
    checked: list[GenerateRequest],
) -> web.StreamResponse:
    out = EventStream(request)
    sink = _ViewSink(out, views) if len(req.inputs) == 1 and not req.is_batch else None
    try:
        # leaving the block closes the streams (client gone, error): their workers abort the requests
        async with contextlib.aclosing(_prompt_events(state, req, checked, sink)) as events:
            async for i, item in events:
                if isinstance(item, GenerationError):
                    if not out.started:
                        raise item  # nothing sent yet: a plain HTTP error
                    await out.write(
                        encode_event({"error": error_body(item.status, item.message, item.err_type)})
                    )
                    continue
                index = i * req.num_samples + item.index
                view = views[index]
                view.update(item)
                await out.write(view.sse_chunk(index if req.is_batch else None))
        return await out.finish()
    except ConnectionResetError:  # the client left mid-stream: stop
        if out.response is None:
            raise
        return out.response


class _ViewSink:
    """Events of a single-prompt stream written at once (an EventSink, router/serving/generator_api.py)."""

    def __init__(self, out: EventStream, views: list[SampleView]):
        self._out = out
        self._views = views

    def ready(self) -> bool:
        return self._out.ready()

    def deliver(self, event: SampleEvent) -> None:
        view = self._views[event.index]
        view.update(event)
        self._out.write_now(view.sse_chunk())


# (prompt index, a SampleEvent of it, or the GenerationError that ended it)
PromptEvents = AsyncIterator[tuple[int, SampleEvent | GenerationError]]


def _prompt_events(
    state: RouterState, req: NativeGenerateRequest, checked: list[GenerateRequest], sink: _ViewSink | None
) -> PromptEvents:
    """Every prompt's events in arrival order (of one prompt, those `sink` did not take); a
    prompt's GenerationError (or a router bug, as a 500) is yielded in its place and ends that
    prompt only."""
    if len(req.inputs) == 1:  # the common case: the stream runs in the handler's task, no queue hop
        return _one_prompt(state, 0, req.inputs[0], checked[0], sink)
    return _merged_prompts(state, req, checked)


async def _merged_prompts(
    state: RouterState, req: NativeGenerateRequest, checked: list[GenerateRequest]
) -> PromptEvents:
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(i: int) -> None:
        try:
            async for item in _one_prompt(state, i, req.inputs[i], checked[i]):
                queue.put_nowait(item)
        finally:
            queue.put_nowait((i, done_marker))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(req.inputs))]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item[1] is done_marker:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:  # client gone (write failed or handler cancelled): abort on the workers
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _one_prompt(
    state: RouterState, i: int, inp: GenerateInput, checked: GenerateRequest, sink: _ViewSink | None = None
) -> PromptEvents:
    try:
        async with contextlib.aclosing(state.generator.stream(inp, checked=checked, sink=sink)) as events:
            async for event in events:
                yield i, event
    except GenerationError as exc:
        yield i, exc
    except Exception as exc:  # a router bug: report it on the stream, keep the other prompts
        logger.exception("streaming prompt %d of a /generate request failed", i)
        yield (
            i,
            GenerationError(
                500, f"Internal error in the router: {type(exc).__name__}", "InternalServerError"
            ),
        )


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)
