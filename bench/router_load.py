"""Closed-loop load for `bench_router`: the same streams sent straight to an engine over ZMQ, or
through the router over HTTP (native /generate, SSE), timed per request.

Rules:
- `run_streams` runs `streams` concurrent loops; each sends a request, waits for its last token,
  pauses a random think time in [0, think_max_s] and sends the next, until `duration_s` has passed
  (the request in flight then finishes). Loops start staggered over `stagger_s`. The think time
  breaks the phase lock a closed loop would otherwise form with the engine's step clock (which
  would hide any added latency shorter than a step inside the wait for the next step).
- A request's TTFT is the arrival of the first output token; E2E the arrival of its last. Samples
  of requests sent before `warmup_s` are dropped. A request that does not end with exactly the
  asked number of tokens is a failure (first error kept).
- `TokenMeter.tokens` counts every token received (also during warm-up), so a caller can read
  tokens/s over any window. The HTTP reader parses no JSON: it takes the last
  `"completion_tokens": N` of each batch of complete SSE events, so the client stays cheap.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import zmq
import zmq.asyncio

from pdserve.shared.protocol import GenerateRequest, OutputBatch, decode, encode

_COUNT = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass
class TokenMeter:
    tokens: int = 0


@dataclass
class LoadResult:
    ttfts: list[float] = field(default_factory=list)
    e2es: list[float] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    first_error: str = ""

    def merge(self, other: LoadResult) -> None:
        self.ttfts += other.ttfts
        self.e2es += other.e2es
        self.completed += other.completed
        self.failed += other.failed
        self.first_error = self.first_error or other.first_error

    def fail(self, message: str) -> None:
        self.failed += 1
        self.first_error = self.first_error or message


# (ttft_s, e2e_s, tokens) of one request, or an error message
RequestFn = Callable[[], Awaitable[tuple[float, float, int] | str]]


async def run_streams(
    request: RequestFn,
    streams: int,
    duration_s: float,
    warmup_s: float,
    expected_tokens: int,
    think_max_s: float,
    stagger_s: float,
    seed: int = 0,
) -> LoadResult:
    """Closed-loop load (see the module docstring); returns the samples after warm-up."""
    result = LoadResult()
    start = time.perf_counter()
    rng = random.Random(seed)

    async def loop(i: int) -> None:
        await asyncio.sleep(stagger_s * i / streams)
        while time.perf_counter() - start < duration_s:
            sent = time.perf_counter()
            outcome = await request()
            if isinstance(outcome, str):
                result.fail(outcome)
            elif outcome[2] != expected_tokens:
                result.fail(f"got {outcome[2]} tokens, asked {expected_tokens}")
            elif sent - start >= warmup_s:
                result.ttfts.append(outcome[0])
                result.e2es.append(outcome[1])
                result.completed += 1
            await asyncio.sleep(rng.uniform(0.0, think_max_s))

    await asyncio.gather(*(loop(i) for i in range(streams)))
    return result


class DirectClient:
    """GenerateRequests straight to an engine's ROUTER socket from one DEALER; outputs routed by rid."""

    def __init__(self, address: str, meter: TokenMeter):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self._meter = meter
        self._pending: dict[str, list] = {}  # rid -> [start, ttft, tokens, future]
        self._ids = itertools.count()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg = decode(await self._sock.recv())
            if not isinstance(msg, OutputBatch):
                continue
            now = time.perf_counter()
            for out in msg.outputs:
                state = self._pending.get(out.rid)
                if state is None:
                    continue
                n = len(out.token_ids)
                self._meter.tokens += n
                if n and state[1] is None:
                    state[1] = now - state[0]
                state[2] += n
                if out.finished:
                    del self._pending[out.rid]
                    if out.error or (out.finish_reason or {}).get("type") == "abort":
                        state[3].set_result(f"aborted: {out.finish_reason}")
                    else:
                        state[3].set_result((state[1] or 0.0, now - state[0], state[2]))

    async def generate(self, input_ids: list[int], max_new_tokens: int) -> tuple[float, float, int] | str:
        rid = f"direct-{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = [time.perf_counter(), None, 0, future]
        params = {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.0}
        await self._sock.send(encode(GenerateRequest(rid=rid, input_ids=input_ids, sampling_params=params)))
        return await future

    async def close(self) -> None:
        self._reader.cancel()
        self._sock.close(linger=0)
        self._ctx.term()


class HttpClient:
    """Streaming native /generate requests through the router on one aiohttp session."""

    def __init__(self, base_url: str, meter: TokenMeter):
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        self._url = base_url.rstrip("/") + "/generate"
        self._meter = meter

    async def generate(self, prompt: str | list[int], max_new_tokens: int) -> tuple[float, float, int] | str:
        """`prompt` as text, or as token ids (sent as `input_ids`)."""
        params = {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.0}
        body = {
            "text" if isinstance(prompt, str) else "input_ids": prompt,
            "sampling_params": params,
            "stream": True,
        }
        start = time.perf_counter()
        ttft = None
        tokens = 0
        buf = b""
        try:
            async with self._session.post(self._url, json=body) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}: {(await resp.text())[:300]}"
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    cut = buf.rfind(b"\n\n")
                    if cut < 0:
                        continue
                    events, buf = buf[:cut], buf[cut + 2 :]
                    if b'"error"' in events:
                        return f"error event: {events[-300:].decode(errors='replace')}"
                    counts = _COUNT.findall(events)
                    if not counts:
                        continue
                    now = time.perf_counter()
                    count = int(counts[-1])
                    if count > tokens:
                        self._meter.tokens += count - tokens
                        tokens = count
                        if ttft is None:
                            ttft = now - start
                    if b'"type": "abort"' in events or b'"type":"abort"' in events:
                        return f"aborted: {events[-300:].decode(errors='replace')}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return (ttft or 0.0, time.perf_counter() - start, tokens)

    async def close(self) -> None:
        await self._session.close()
