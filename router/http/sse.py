"""Server-sent events as SGLang and OpenAI stream them: `data: <json>\n\n` lines, then `data: [DONE]`.

    resp = await open_sse(request)
    await send_event(resp, {"text": "Hi", ...})
    await send_done(resp)

    events = EventStream(request)           # opened with its first event
    await events.write(encode_event(first))
    if events.ready(): events.write_now(encode_event(later))   # synchronously, from any callback

Rules: JSON is compact and keeps non-ASCII characters as they are; the response is not buffered
by proxies (`X-Accel-Buffering: no`) or cached. A client that went away makes a write raise
ConnectionResetError: the caller stops generating (and so aborts the request on its worker).
`open_sse` is called when the first event is ready, and the headers leave with that event in one
write (not in a write of their own at `prepare()`: on loopback each write is a system call that
wakes the client, about 0.1 ms on the dev box, on every stream's time to first token).

`EventStream.write_now` puts an event on the socket without a coroutine: how tokens delivered
inline (router/serving/inbox.py) reach their client. It frames the chunk itself and writes it to the
transport behind what aiohttp wrote, so it is allowed only once the headers went out (after the
first `write`) and while the socket takes data (its buffer under aiohttp's drain limit, not
closing); otherwise the event takes the `write` way, which waits for the client to read.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

DONE = b"data: [DONE]\n\n"

# The events' JSON (compact, non-ASCII kept), built once: json.dumps with arguments other than the
# defaults builds a new encoder at every call.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_event(data: Any) -> bytes:
    return b"data: " + encode_json(data).encode() + b"\n\n"


class _EventStreamResponse(web.StreamResponse):
    # aiohttp's StreamResponse writes its headers at prepare(); with this (what web.Response does)
    # they are kept and sent with the first body write. An aiohttp without the attribute sends them
    # at prepare(), as before: slower, never wrong.
    _send_headers_immediately = False


async def open_sse(request: web.Request) -> web.StreamResponse:
    """The prepared event-stream response; its headers go out with the first event written."""
    resp = _EventStreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    if request.version == HttpVersion11:
        resp.enable_chunked_encoding()  # what aiohttp does anyway; explicit, so that EventStream frames alike
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, data: Any) -> None:
    await resp.write(encode_event(data))


async def send_done(resp: web.StreamResponse) -> None:
    await resp.write(DONE)


# aiohttp's StreamWriter drains (waits for the client) past this many bytes written
_WRITE_BUFFER_LIMIT = 0x10000


class EventStream:
    """An event-stream response opened with its first event; later events may be written at once."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None
        self._headers_sent = False

    @property
    def started(self) -> bool:
        return self.response is not None

    async def write(self, data: bytes) -> None:
        """Opens the response with the first write; raises ConnectionResetError when the client left."""
        if self.response is None:
            self.response = await open_sse(self.request)
        await self.response.write(data)
        self._headers_sent = True

    def ready(self) -> bool:
        """Whether `write_now` may write now (headers out, socket open and not backed up)."""
        if not self._headers_sent:
            return False
        transport = self.request.transport
        return (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() <= _WRITE_BUFFER_LIMIT
        )

    def write_now(self, data: bytes) -> None:
        """After `ready()`: the event goes on the socket now, framed as aiohttp frames it."""
        assert self.response is not None and self.request.transport is not None
        if self.response.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.request.transport.write(data)

    async def finish(self) -> web.StreamResponse:
        """`data: [DONE]` and the end of the body (opening the response if nothing was sent)."""
        await self.write(DONE)
        assert self.response is not None
        await self.response.write_eof()
        return self.response
