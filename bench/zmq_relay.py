"""The relay floor for `bench_router`: HTTP in, the router's own ZMQ connection to the worker, SSE
out, and nothing else.

    python -m pdserve.bench.zmq_relay --port 0 --worker-addr tcp://127.0.0.1:30001

POST /generate takes `input_ids` and `sampling_params`, sends them to the worker as one
GenerateRequest through `router.cluster.worker_conn.WorkerConnection` (the socket, reader callback and
delivery slices the router uses), and streams one minimal `data:` event per output, then
`data: [DONE]`. It tokenizes, validates, routes, detokenizes and builds no views. So in
`bench_router`: relay minus HTTP floor is what the router's design costs by itself (one more
process hop over ZMQ, with its I/O threads), and router minus relay is the router's own work on
top of that. Same process shape as the router: one process, uvloop. Start-up prints
`zmq relay ready url=http://host:port` once the worker's connection is up.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys

import zmq.asyncio
from aiohttp import web

from pdserve.bench.http_floor import run_until_interrupted, serve_forever
from pdserve.router.cluster.worker_conn import StreamFailure, WorkerConnection
from pdserve.shared.protocol import GenerateRequest

READY_PREFIX = "zmq relay ready"
CONN_KEY = web.AppKey("relay_conn", WorkerConnection)
IDS_KEY = web.AppKey("relay_ids", itertools.count)


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    conn = request.app[CONN_KEY]
    rid = f"relay-{next(request.app[IDS_KEY])}"
    queue: asyncio.Queue = asyncio.Queue()
    conn.subscribe(rid, queue)
    try:
        conn.send_nowait(
            GenerateRequest(rid=rid, input_ids=body["input_ids"], sampling_params=body["sampling_params"])
        )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        count = 0
        while True:
            out = await queue.get()
            if isinstance(out, StreamFailure):
                await resp.write(b'data: {"error": "' + out.reason.encode() + b'"}\n\n')
                break
            count += len(out.token_ids)
            event = {"output_ids": out.token_ids, "meta_info": {"id": rid, "completion_tokens": count}}
            await resp.write(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
            if out.finished:
                break
        await resp.write(b"data: [DONE]\n\n")
        return resp
    finally:
        conn.unsubscribe(rid)


async def serve(host: str, port: int, worker_addr: str) -> None:
    conn = WorkerConnection(zmq.asyncio.Context(), worker_addr, name="relay")
    conn.start()
    while not conn.connected:
        await asyncio.sleep(0.05)
    app = web.Application()
    app[CONN_KEY] = conn
    app[IDS_KEY] = itertools.count()
    app.router.add_post("/generate", generate)
    await serve_forever(app, host, port, READY_PREFIX)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="HTTP in, ZMQ to the worker, SSE out: the relay floor.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--worker-addr", required=True)
    ns = p.parse_args(argv)
    return run_until_interrupted(serve(ns.host, ns.port, ns.worker_addr))


if __name__ == "__main__":
    sys.exit(main())
