"""The HTTP floor for `bench_router`: an aiohttp server that streams /generate SSE with no routing.

    python -m pdserve.bench.http_floor --port 0 --step-ms 20

It answers POST /generate the way the router's native stream looks (one `data:` event per token
with the cumulative `text`, `output_ids` and `meta_info`, then `data: [DONE]`), sending the first
event at once and the next ones on a global grid of `--step-ms` (like the stand-in's step
clock), but tokenizes, dispatches and detokenizes nothing.
Router minus floor is therefore the router's own logic; floor minus direct ZMQ is what aiohttp and
HTTP on loopback cost by themselves. Same process shape as the router: one process, uvloop.
Start-up prints `http floor ready url=http://host:port`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time

from aiohttp import web

READY_PREFIX = "http floor ready"
WORD = " fox"


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = int(body.get("sampling_params", {}).get("max_new_tokens", 16))
    step_s = request.app["step_s"]
    rid = f"floor-{next(request.app['ids'])}"
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    # later events on a global step grid, as the stand-in's step clock: the same E2E distribution
    first_tick = (time.monotonic() // step_s + 1) * step_s if step_s > 0 else time.monotonic()
    for i in range(1, n + 1):
        finish = {"type": "length", "length": n} if i == n else None
        meta = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": 1,
            "completion_tokens": i,
            "cached_tokens": 0,
        }
        event = {"text": WORD * i, "output_ids": [1] * i, "meta_info": meta}
        await resp.write(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
        if i < n:
            await asyncio.sleep(max(first_tick + (i - 1) * step_s - time.monotonic(), 0.0))
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def serve(host: str, port: int, step_ms: float) -> None:
    app = web.Application()
    app["step_s"] = step_ms / 1000.0
    app["ids"] = itertools.count()
    app.router.add_post("/generate", generate)
    await serve_forever(app, host, port, READY_PREFIX)


async def serve_forever(app: web.Application, host: str, port: int, ready_prefix: str) -> None:
    """Serves app on host:port (0: a free port), prints `<ready_prefix> url=...`, runs until killed."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"{ready_prefix} url=http://{host}:{bound}", flush=True)
    await asyncio.Event().wait()


def run_until_interrupted(main_coro) -> int:
    """uvloop.run(main_coro); Ctrl-C (or SIGINT from the benchmark) ends it quietly."""
    import uvloop

    try:
        uvloop.run(main_coro)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="An aiohttp SSE server with no routing: the HTTP floor.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--step-ms", type=float, default=20.0)
    ns = p.parse_args(argv)
    return run_until_interrupted(serve(ns.host, ns.port, ns.step_ms))


if __name__ == "__main__":
    sys.exit(main())
