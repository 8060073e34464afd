"""bench_serving's backends without a server: the payload each backend sends, SSE lines, and
`send_request` parsing each backend's stream, run against an in-process aiohttp server that replays
canned SSE streams with known token counts.
"""

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pdserve.bench.serving_backends import (
    RequestInput,
    build_payload,
    merge_body,
    send_request,
    sse_data,
)

SHAREGPT = Path(__file__).parent / "data" / "sharegpt_small.json"


# ---------------------------------------------------------------------- payloads


def test_payloads_per_backend():
    req = RequestInput("Hello", 5, 16)
    assert build_payload("sglang", req, "m", True) == {
        "text": "Hello",
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True},
        "stream": True,
    }
    ids = build_payload("sglang", RequestInput([1, 2, 3], 3, 4), "m", False)
    assert ids["input_ids"] == [1, 2, 3] and "text" not in ids and ids["stream"] is False
    oai = build_payload("sglang-oai", req, "m", True)
    assert oai == {
        "model": "m", "prompt": "Hello", "temperature": 0.0, "max_tokens": 16, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    assert build_payload("vllm", req, "m", True) == oai
    assert "stream_options" not in build_payload("vllm", req, "m", False)
    chat = build_payload("sglang-oai-chat", req, "m", True)
    assert chat["messages"] == [{"role": "user", "content": "Hello"}] and chat["max_tokens"] == 16
    with pytest.raises(ValueError):
        build_payload("sglang-oai-chat", RequestInput([1], 1, 1), "m", True)
    extra = build_payload("sglang", req, "m", True, {"sampling_params": {"top_k": 1}, "rid": "x"})
    assert extra["sampling_params"] == {
        "temperature": 0.0,
        "max_new_tokens": 16,
        "ignore_eos": True,
        "top_k": 1,
    }
    assert extra["rid"] == "x"
    assert merge_body({"a": {"b": 1}}, {"a": 3}) == {"a": 3}


def test_sse_data():
    assert sse_data(b'data: {"a": 1}\n') == '{"a": 1}'
    assert sse_data(b"data:[DONE]\r\n") == "[DONE]"
    assert sse_data(b"\n") is None and sse_data(b": keep-alive\n") is None


# ---------------------------------------------------------------------- stream parsing


def _sse(events: list) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events
    )


NATIVE = [
    {"text": "a", "meta_info": {"completion_tokens": 1, "finish_reason": None}},
    {"text": "abc", "meta_info": {"completion_tokens": 3, "finish_reason": None}},
    {"text": "abcd", "meta_info": {"completion_tokens": 4, "finish_reason": {"type": "length", "length": 4}}},
    b"[DONE]",
]
OPENAI = [
    {"choices": [{"index": 0, "text": "a", "finish_reason": None}]},
    {"choices": [{"index": 0, "text": "", "finish_reason": None}]},
    {"choices": [{"index": 0, "text": "bc", "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    b"[DONE]",
]
CHAT = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
    {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    b"[DONE]",
]
ABORTED = [
    {"text": "a", "meta_info": {"completion_tokens": 1}},
    {
        "text": "a",
        "meta_info": {"completion_tokens": 1, "finish_reason": {"type": "abort", "message": "gone"}},
    },
    b"[DONE]",
]


async def _serve_and_send(cases):
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        kind = body.get("rid") or body.get("user")
        if kind == "http-error":
            return web.json_response({"error": {"message": "bad"}}, status=400)
        if kind == "plain":
            return web.json_response({"text": "xyz", "meta_info": {"completion_tokens": 3}})
        events = {"native": NATIVE, "openai": OPENAI, "chat": CHAT, "aborted": ABORTED,
                  "error": [{"error": {"message": "worker died"}}], "empty": [b"[DONE]"]}[kind]  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(_sse([event]))
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
        app.router.add_post(route, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            out = []
            for backend, route, key, kind, stream in cases:
                url = f"http://127.0.0.1:{port}{route}"
                extra = {key: kind}
                out.append(
                    await send_request(session, url, backend, RequestInput("p", 5, 4), "m", stream, extra)
                )
            return out
    finally:
        await runner.cleanup()


def test_send_request_parses_each_backend():
    cases = [
        ("sglang", "/generate", "rid", "native", True),
        ("sglang-oai", "/v1/completions", "user", "openai", True),
        ("sglang-oai-chat", "/v1/chat/completions", "user", "chat", True),
        ("sglang", "/generate", "rid", "plain", False),
        ("sglang", "/generate", "rid", "aborted", True),
        ("sglang", "/generate", "rid", "error", True),
        ("sglang", "/generate", "rid", "http-error", True),
        ("sglang", "/generate", "rid", "empty", True),
    ]
    native, openai, chat, plain, aborted, error, http_error, empty = asyncio.run(_serve_and_send(cases))
    assert native.success and native.output_len == 4 and native.generated_text == "abcd"
    assert len(native.itl) == 3 and native.itl[0] == pytest.approx(native.itl[1])  # 2 tokens in one event
    assert [n for _, n in native.token_times] == [1, 2, 1]
    assert 0 < native.ttft < native.latency and native.prompt_len == 5
    assert (
        openai.success and openai.output_len == 3 and openai.generated_text == "abc" and len(openai.itl) == 1
    )
    assert chat.success and chat.output_len == 2 and chat.generated_text == "Hi!" and len(chat.itl) == 1
    assert plain.success and plain.output_len == 3 and plain.itl == [] and plain.ttft > 0
    assert not aborted.success and aborted.error == "aborted: gone"
    assert not error.success and error.error == "worker died"
    assert not http_error.success and http_error.error.startswith("HTTP 400:") and "bad" in http_error.error
    assert not empty.success and empty.error == "the stream ended without output tokens"
