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
from typing import Any

from aiohttp import web

from pdserve.router.errors import error_body
from pdserve.router.generation import GenerateInput, GenerationError, SampleEvent
from pdserve.router.limits import read_json_object
from pdserve.router.native_parse import NativeGenerateRequest, parse_generate
from pdserve.router.sample_tracker import LOGPROB_FIELDS
from pdserve.router.sse import open_sse, send_done, send_event
from pdserve.router.state import STATE_KEY, RouterState

logger = logging.getLogger(__name__)

# Logprob fields always present when return_logprob is set; the others only when asked for.
_BASE_LOGPROB_FIELDS = ("input_token_logprobs", "output_token_logprobs")


class SampleView:
    """The cumulative state of one sample as the native API shows it."""

    def __init__(self, inp: GenerateInput, index: int, num_samples: int, start: float, weight_version: str):
        self.inp = inp
        self.sample_id = inp.rid if num_samples == 1 else f"{inp.rid}-{index}"
        self.start = start
        self.weight_version = weight_version
        self.text = ""
        self.output_ids: list[int] = []
        self.meta: dict[str, Any] = {}
        self.logprobs: dict[str, list] = {}
        if inp.return_logprob:
            for name in _BASE_LOGPROB_FIELDS:
                self.logprobs[name] = []
            if inp.top_logprobs_num > 0:
                self.logprobs["input_top_logprobs"] = []
                self.logprobs["output_top_logprobs"] = []
            if inp.token_ids_logprob is not None:
                self.logprobs["input_token_ids_logprobs"] = []
                self.logprobs["output_token_ids_logprobs"] = []
        self.finished = False
        self.finish_reason: dict[str, Any] | None = None

    def update(self, event: SampleEvent) -> None:
        self.text = event.text
        self.output_ids = event.output_ids
        self.finished = event.finished
        self.finish_reason = event.finish_reason
        self.meta = {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "cached_tokens": event.cached_tokens,
        }
        if self.inp.return_logprob:
            for name in LOGPROB_FIELDS:
                values = getattr(event, name)
                if values is not None:
                    self.logprobs.setdefault(name, []).extend(values)

    def to_dict(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.sample_id,
            "finish_reason": self.finish_reason,
            **self.meta,
            "weight_version": self.weight_version,
        }
        if self.finished:
            meta["e2e_latency"] = round(time.perf_counter() - self.start, 6)
        meta.update(self.logprobs)
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}


def _views(state: RouterState, req: NativeGenerateRequest, start: float) -> list[SampleView]:
    n = req.num_samples
    return [SampleView(inp, j, n, start, state.weight_version) for inp in req.inputs for j in range(n)]


async def handle_generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    start = time.perf_counter()
    body = await read_json_object(request)
    tokenizer = state.require_tokenizer()
    req = parse_generate(body, tokenizer, state.args.max_batch_size)
    for inp in req.inputs:  # every prompt is checked before any is sent
        state.generator.check(inp)
    views = _views(state, req, start)
    if req.stream:
        return await _stream(request, state, req, views)
    return await _collect(state, req, views)


async def _collect(state: RouterState, req: NativeGenerateRequest, views: list[SampleView]) -> web.Response:
    async def one(i: int, inp: GenerateInput) -> None:
        async for event in state.generator.stream(inp, buffered=True):
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
    request: web.Request, state: RouterState, req: NativeGenerateRequest, views: list[SampleView]
) -> web.StreamResponse:
    queue: asyncio.Queue = asyncio.Queue()
    done_marker = object()

    async def pump(i: int, inp: GenerateInput) -> None:
        try:
            async for event in state.generator.stream(inp):
                queue.put_nowait((i, event))
        except GenerationError as exc:
            queue.put_nowait((i, exc))
        except Exception as exc:  # a router bug: report it on the stream, keep the other prompts
            logger.exception("streaming prompt %d of a /generate request failed", i)
            queue.put_nowait(
                (
                    i,
                    GenerationError(
                        500, f"Internal error in the router: {type(exc).__name__}", "InternalServerError"
                    ),
                )
            )
        finally:
            queue.put_nowait((i, done_marker))

    tasks = [asyncio.ensure_future(pump(i, inp)) for i, inp in enumerate(req.inputs)]
    resp: web.StreamResponse | None = None
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is done_marker:
                running -= 1
                continue
            if isinstance(item, GenerationError):
                if resp is None:
                    raise item  # nothing sent yet: a plain HTTP error
                await send_event(resp, {"error": error_body(item.status, item.message, item.err_type)})
                continue
            if resp is None:
                resp = await open_sse(request)
            index = i * req.num_samples + item.index
            view = views[index]
            view.update(item)
            chunk = view.to_dict()
            if req.is_batch:
                chunk["index"] = index
            await send_event(resp, chunk)
        if resp is None:
            resp = await open_sse(request)
        await send_done(resp)
        return resp
    except ConnectionResetError:  # the client left mid-stream: stop (the finally aborts the rest)
        if resp is None:
            raise
        return resp
    finally:
        for task in tasks:  # client gone (write failed or handler cancelled): abort on the workers
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)
