"""Server-sent events as SGLang and OpenAI stream them: `data: <json>\n\n` lines, then `data: [DONE]`.

    resp = await open_sse(request)
    await send_event(resp, {"text": "Hi", ...})
    await send_done(resp)

Rules: JSON is compact and keeps non-ASCII characters as they are; the response is not buffered
by proxies (`X-Accel-Buffering: no`) or cached. A client that went away makes a write raise
ConnectionResetError: the caller stops generating (and so aborts the request on its worker).
`open_sse` is called when the first event is ready, and the headers leave with that event in one
write (not in a write of their own at `prepare()`: on loopback each write is a system call that
wakes the client, about 0.1 ms on the dev box, on every stream's time to first token).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

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
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, data: Any) -> None:
    await resp.write(encode_event(data))


async def send_done(resp: web.StreamResponse) -> None:
    await resp.write(DONE)
