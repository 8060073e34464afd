"""router/http/sse.py's EventStream over a real aiohttp server and real sockets: events written at once
(`write_now`) and through `write` arrive in order and framed alike; a client that does not read
makes `ready()` false (the writer then waits for it) instead of growing the buffer without bound;
HTTP/1.0 clients get the events unframed."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from pdserve.router.http.sse import DONE, EventStream, encode_event

EVENTS = 400
PAD = "x" * 40_000  # ~40 KB events: 16 MB in all, more than loopback's socket buffers hold


async def _serve(handler) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


def _handler(ways: list[str]):
    async def handle(request: web.Request) -> web.StreamResponse:
        events = EventStream(request)
        await events.write(encode_event({"i": 0, "pad": PAD}))
        for i in range(1, EVENTS):
            data = encode_event({"i": i, "pad": PAD})
            if events.ready():
                events.write_now(data)
                ways.append("now")
            else:
                await events.write(data)
                ways.append("waited")
        return await events.finish()

    return handle


def _indices(body: bytes) -> list[int]:
    import json

    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == DONE.strip()
    return [json.loads(e[len(b"data: ") :])["i"] for e in events[:-1]]


def test_events_written_now_and_waited_arrive_in_order_and_a_slow_client_applies_backpressure():
    async def run():
        ways: list[str] = []
        runner, port = await _serve(_handler(ways))
        try:
            async with aiohttp.ClientSession() as session, session.post(f"http://127.0.0.1:{port}/") as resp:
                await asyncio.sleep(0.5)  # not reading: the server's socket fills up
                body = await resp.read()
                assert resp.headers["Transfer-Encoding"] == "chunked"
        finally:
            await runner.cleanup()
        assert _indices(body) == list(range(EVENTS))
        assert "now" in ways and "waited" in ways  # both ways were taken, and interleaved correctly

    asyncio.run(run())


def test_an_http_1_0_client_gets_the_events_unframed():
    async def run():
        ways: list[str] = []
        runner, port = await _serve(_handler(ways))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            raw = await reader.read(-1)  # HTTP/1.0: the body ends when the server closes
            writer.close()
        finally:
            await runner.cleanup()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head
        assert _indices(body) == list(range(EVENTS))
        assert "now" in ways

    asyncio.run(run())
