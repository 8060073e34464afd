"""Consuming the generator for the OpenAI routes: fan-in of prompts, collecting, streaming SSE.

Rules:
- `merge_streams` yields `(prompt_index, SampleEvent)` in arrival order across prompts. A
  `GenerationError` of any prompt is re-raised to the consumer; closing the merged generator
  (client gone, error) cancels every prompt's stream, which aborts it on its worker.
- Consume it inside `contextlib.aclosing(...)` so that closing happens at once, not at GC.
- `SSEWriter` sends the HTTP headers only with the first event, so an error raised before any event
  still becomes a normal JSON error response with its status. A write to a client that went away
  raises `ClientGone`.
- `collect_choices` (non-streaming) asks for buffered streams: a worker failure anywhere in the
  request is retried from scratch, since the client saw nothing yet. `stream_choices` sends each
  event as soon as it comes; a failure after the first chunk becomes an `{"error": ...}` event
  followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdserve.router.http.errors import error_response
from pdserve.router.http.sse import EventStream, encode_event
from pdserve.router.openai.responses import ChoiceState, aggregate_usage, error_event, usage_chunk
from pdserve.router.serving.generator_api import (
    STATUS_TYPES,
    EventSink,
    GenerateInput,
    GenerationError,
    SampleEvent,
    TextGenerator,
)

_END = object()


def _stream(
    generator: TextGenerator, inp: GenerateInput, buffered: bool, sink: EventSink | None = None
) -> AsyncIterator[SampleEvent]:
    # `buffered` (RouterTextGenerator): one finished event per sample, retried from scratch on a
    # worker failure; `sink`: where ordinary events go at once. Each only asked for, so that
    # TextGenerators without them still serve streams.
    if buffered:
        return generator.stream(inp, buffered=True)  # type: ignore[call-arg]
    return generator.stream(inp, sink=sink) if sink is not None else generator.stream(inp)  # type: ignore[call-arg]


async def merge_streams(
    generator: TextGenerator,
    inputs: list[GenerateInput],
    buffered: bool = False,
    sink: EventSink | None = None,
) -> AsyncIterator[tuple[int, SampleEvent]]:
    """`sink` (one prompt only) takes that prompt's ordinary events at once; they are not yielded."""
    if len(inputs) == 1:  # the common case: no tasks, the stream runs in the handler's task
        async for ev in _stream(generator, inputs[0], buffered, sink):
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, inp: GenerateInput) -> None:
        try:
            async for ev in _stream(generator, inp, buffered):
                queue.put_nowait((i, ev))
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            queue.put_nowait((i, exc))
        else:
            queue.put_nowait((i, _END))

    tasks = [asyncio.create_task(pump(i, inp)) for i, inp in enumerate(inputs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClientGone(Exception):
    """The client closed the connection while we were streaming to it."""


class SSEWriter:
    """Server-sent events (router/http/sse.py's EventStream), headers sent with the first event."""

    def __init__(self, request: web.Request):
        self.events = EventStream(request)

    @property
    def started(self) -> bool:
        return self.events.started

    @property
    def response(self) -> web.StreamResponse | None:
        return self.events.response

    async def send(self, payload: dict[str, Any]) -> None:
        try:
            await self.events.write(encode_event(payload))
        except (ConnectionError, RuntimeError) as exc:  # aiohttp: reset / "cannot write to closing transport"
            raise ClientGone() from exc

    def ready(self) -> bool:
        return self.events.ready()

    def send_now(self, payload: dict[str, Any]) -> None:
        """After `ready()`: the event goes on the socket now."""
        self.events.write_now(encode_event(payload))

    async def finish(self) -> web.StreamResponse:
        """`data: [DONE]` and the end of the body; a client already gone is not an error here."""
        try:
            await self.events.finish()
        except (ConnectionError, RuntimeError):
            pass
        assert self.response is not None
        return self.response


# ---------------------------------------------------------------- drivers shared by the two endpoints


def abort_error(reason: dict[str, Any] | None) -> GenerationError | None:
    """A sample the router ended with an error status (worker lost: 503, --request-timeout: 504).

    Aborts asked by a client (/abort_request) carry no status: they end the choice normally with
    finish_reason "abort", as SGLang answers them (and as the native /generate does).
    """
    if reason is None or reason.get("type") != "abort" or not reason.get("status_code"):
        return None
    status = int(reason["status_code"])
    message = reason.get("message") or "The request was aborted."
    return GenerationError(status, message, STATUS_TYPES.get(status, "InternalServerError"))


async def collect_choices(generator: TextGenerator, inputs: list[GenerateInput], n: int) -> list[ChoiceState]:
    """Every choice of a non-streaming request, complete; raises GenerationError (aborts too)."""
    choices = [ChoiceState(i) for i in range(len(inputs) * n)]
    async with aclosing(merge_streams(generator, inputs, buffered=True)) as events:
        async for p, ev in events:
            choice = choices[p * n + ev.index]
            choice.add(ev)
            err = abort_error(choice.finish_reason)
            if err is not None:
                raise err
    return choices


# (prompt index, its choice after adding the event, the event) -> chunks to send
ChunkMaker = Callable[[int, ChoiceState, SampleEvent], list[dict[str, Any]]]


@dataclass
class StreamSpec:
    rid: str
    created: int
    model: str
    obj: str  # "text_completion" | "chat.completion.chunk"
    n: int
    prompt_lens: list[int]
    include_usage: bool = False
    continuous_usage_stats: bool = False


async def stream_choices(
    request: web.Request,
    generator: TextGenerator,
    inputs: list[GenerateInput],
    spec: StreamSpec,
    make_chunks: ChunkMaker,
) -> web.StreamResponse:
    """Streams every choice as SSE chunks; an error before the first chunk is a plain error response."""
    choices = [ChoiceState(i) for i in range(len(inputs) * spec.n)]
    sse = SSEWriter(request)

    def chunks_for(p: int, ev: SampleEvent) -> list[dict[str, Any]]:
        choice = choices[p * spec.n + ev.index]
        choice.add(ev)
        err = abort_error(choice.finish_reason)
        if err is not None:
            raise err
        usage = aggregate_usage(choices, spec.n, spec.prompt_lens) if spec.continuous_usage_stats else None
        chunks = make_chunks(p, choice, ev)
        if usage is not None:
            for chunk in chunks:
                chunk["usage"] = usage
        return chunks

    sink = _ChunkSink(sse, chunks_for) if len(inputs) == 1 else None
    try:
        async with aclosing(merge_streams(generator, inputs, sink=sink)) as events:
            async for p, ev in events:
                for chunk in chunks_for(p, ev):
                    await sse.send(chunk)
        if spec.include_usage:
            usage = aggregate_usage(choices, spec.n, spec.prompt_lens)
            await sse.send(usage_chunk(spec.rid, spec.created, spec.model, spec.obj, usage))
    except GenerationError as exc:
        if not sse.started:
            return error_response(exc.status, exc.message, exc.err_type, headers=exc.headers)
        try:
            await sse.send(error_event(exc.status, exc.message, exc.err_type))
        except ClientGone:
            return sse.response  # type: ignore[return-value]
    except ClientGone:  # leaving the `async with` closed the streams: the workers abort the request
        return sse.response  # type: ignore[return-value]
    return await sse.finish()


class _ChunkSink:
    """A single prompt's ordinary events, written at once as their chunks (an EventSink,
    router/serving/generator_api.py)."""

    def __init__(self, sse: SSEWriter, chunks_for: Callable[[int, SampleEvent], list[dict[str, Any]]]):
        self._sse = sse
        self._chunks_for = chunks_for

    def ready(self) -> bool:
        return self._sse.ready()

    def deliver(self, event: SampleEvent) -> None:
        for chunk in self._chunks_for(0, event):
            self._sse.send_now(chunk)
