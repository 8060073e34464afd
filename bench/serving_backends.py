"""The HTTP side of `bench_serving`: one request per backend, timed token by token.

Backends and routes:
- sglang:          POST /generate, `text` (or `input_ids`) + `sampling_params`; SSE events carry the
                   cumulative `text` and `meta_info.completion_tokens`;
- sglang-oai, vllm: POST /v1/completions, `prompt` (text or token ids); SSE chunks carry text deltas;
- sglang-oai-chat: POST /v1/chat/completions, one user message; chunks carry `delta.content`.
Every request is greedy (temperature 0) with `ignore_eos`, so outputs have exactly the asked length;
OpenAI streams ask `stream_options.include_usage` so the token count comes from the server.
`--extra-request-body` is merged into the payload (dicts one level deep: a `sampling_params` given
there adds to the benchmark's own instead of replacing it).

Timing rules (perf_counter seconds): TTFT is the arrival of the first event that carries output
tokens; an event carrying k new tokens (known from the running `completion_tokens` of the native
API) adds k inter-token latencies of (gap / k) each, as SGLang does; OpenAI chunks count one event
per non-empty delta, and the chunk with the finish reason counts even when empty (an output whose
tokens are all invisible still has a first-token time). The token count of an OpenAI stream is the
final `usage.completion_tokens`. A request fails on a non-200 status, an `error` event, a finish
reason of type `abort`, a connection error, or a stream that ends without output; `error` says which.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

BACKENDS = ("sglang", "sglang-oai", "sglang-oai-chat", "vllm")
ROUTES = {
    "sglang": "/generate",
    "sglang-oai": "/v1/completions",
    "vllm": "/v1/completions",
    "sglang-oai-chat": "/v1/chat/completions",
}


@dataclass
class RequestInput:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    """One request's outcome. Times are perf_counter seconds; `ttft` and `latency` are from send."""

    success: bool = False
    prompt_len: int = 0
    output_len: int = 0  # tokens the server reports (else the events counted)
    generated_text: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (arrival, new tokens)
    error: str = ""


def merge_body(payload: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """payload updated by extra, dict values merged one level deep."""
    out = dict(payload)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def build_payload(
    backend: str, req: RequestInput, model: str, stream: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON body of req for backend (see the module docstring)."""
    if backend == "sglang":
        key = "text" if isinstance(req.prompt, str) else "input_ids"
        params = {"temperature": 0.0, "max_new_tokens": req.output_len, "ignore_eos": True}
        payload: dict[str, Any] = {key: req.prompt, "sampling_params": params, "stream": stream}
    elif backend in ("sglang-oai", "vllm"):
        payload = {
            "model": model,
            "prompt": req.prompt,
            "temperature": 0.0,
            "max_tokens": req.output_len,
            "ignore_eos": True,
            "stream": stream,
        }
    elif backend == "sglang-oai-chat":
        if not isinstance(req.prompt, str):
            raise ValueError("sglang-oai-chat sends text messages: token-id prompts need another backend")
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": req.prompt}],
            "temperature": 0.0,
            "max_tokens": req.output_len,
            "ignore_eos": True,
            "stream": stream,
        }
    else:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if stream and backend != "sglang":
        payload["stream_options"] = {"include_usage": True}
    return merge_body(payload, extra)


def sse_data(line: bytes) -> str | None:
    """The payload of an SSE `data:` line, stripped; None for blank lines, comments and other fields."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip().decode("utf-8")


def error_text(data: dict[str, Any]) -> str:
    err = data.get("error")
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


class StreamTimer:
    """Turns the arrival of output tokens into TTFT, ITL and token_times of one RequestResult."""

    def __init__(self, result: RequestResult):
        self.result = result
        self.last_time = 0.0
        self.tokens = 0

    def tokens_arrived(self, now: float, new_tokens: int) -> None:
        if new_tokens <= 0:
            return
        res = self.result
        if self.tokens == 0:
            res.ttft = now - res.start
        else:
            res.itl.extend([(now - self.last_time) / new_tokens] * new_tokens)
        res.token_times.append((now, new_tokens))
        self.last_time = now
        self.tokens += new_tokens


def _finish_reason_error(reason: Any) -> str:
    if isinstance(reason, dict) and reason.get("type") == "abort":
        return f"aborted: {reason.get('message', '')}"
    if reason == "abort":
        return "aborted"
    return ""


def handle_sglang_event(data: dict[str, Any], timer: StreamTimer, now: float) -> None:
    """One native /generate event (or the whole non-streamed response)."""
    res = timer.result
    if "error" in data:
        res.error = error_text(data)
        return
    meta = data.get("meta_info") or {}
    text = data.get("text", "")
    count = meta.get("completion_tokens")
    if count is None:  # no count: each event that grows the text is one token
        count = timer.tokens + (1 if len(text) > len(res.generated_text) else 0)
    timer.tokens_arrived(now, count - timer.tokens)
    res.generated_text = text
    res.output_len = timer.tokens
    res.error = res.error or _finish_reason_error(meta.get("finish_reason"))


def handle_openai_event(data: dict[str, Any], timer: StreamTimer, now: float, chat: bool) -> None:
    """One OpenAI chunk (or the whole non-streamed response): text deltas and the final usage."""
    res = timer.result
    if "error" in data:
        res.error = error_text(data)
        return
    for choice in data.get("choices") or []:
        if chat:
            part = (choice.get("delta") or choice.get("message") or {}).get("content") or ""
        else:
            part = choice.get("text") or ""
        # a chunk with text, or the final one (the tokens may all be invisible: special, partial UTF-8)
        if part or choice.get("finish_reason") is not None:
            timer.tokens_arrived(now, 1)
            res.generated_text += part
        res.error = res.error or _finish_reason_error(choice.get("finish_reason"))
    usage = data.get("usage")
    res.output_len = usage["completion_tokens"] if usage else max(res.output_len, timer.tokens)


EventHandler = Callable[[dict[str, Any], StreamTimer, float], None]


def event_handler(backend: str) -> EventHandler:
    if backend == "sglang":
        return handle_sglang_event
    chat = backend == "sglang-oai-chat"
    return lambda data, timer, now: handle_openai_event(data, timer, now, chat)


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    backend: str,
    req: RequestInput,
    model: str,
    stream: bool = True,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    """Sends req and times its stream; never raises for a failed request (see RequestResult.error)."""
    payload = build_payload(backend, req, model, stream, extra)
    handle = event_handler(backend)
    res = RequestResult(prompt_len=req.prompt_len)
    timer = StreamTimer(res)
    res.start = time.perf_counter()
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                res.error = f"HTTP {resp.status}: {body}"
                return res
            if stream:
                async for line in resp.content:
                    data = sse_data(line)
                    if data is None or data == "[DONE]":
                        continue
                    handle(json.loads(data), timer, time.perf_counter())
                    if res.error:
                        break
            else:
                body_json = await resp.json(content_type=None)
                if isinstance(body_json, list):  # a batched native response: bench sends one prompt
                    body_json = body_json[0]
                handle(body_json, timer, time.perf_counter())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency = time.perf_counter() - res.start
    if not res.error and res.output_len == 0 and req.output_len > 0:
        res.error = "the stream ended without output tokens"
    res.success = not res.error
    return res


SendFn = Callable[[RequestInput], Awaitable[RequestResult]]
