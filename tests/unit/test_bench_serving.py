"""bench_serving without a server: datasets, arrival times, metrics, payloads and stream parsing.

Datasets use the tiny models' byte-level tokenizer (one token per UTF-8 byte, 3 special tokens), so
lengths can be checked exactly. Stream parsing runs `send_request` against an in-process aiohttp
server that replays canned SSE streams with known token counts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from pdserve.bench import serving_datasets as ds
from pdserve.bench.bench_serving import arrival_offsets, build_parser, result_line
from pdserve.bench.serving_backends import (
    RequestInput,
    RequestResult,
    StreamTimer,
    build_payload,
    merge_body,
    send_request,
    sse_data,
)
from pdserve.bench.serving_metrics import compute_metrics, format_report, peak_concurrency, peak_tokens_per_s
from tests.helpers.tiny_models import _byte_tokenizer

SHAREGPT = Path(__file__).parent / "data" / "sharegpt_small.json"


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- datasets


def test_sample_lengths_stay_in_range():
    lens = ds.sample_lengths(rng(), 100, 0.5, 2000)
    assert min(lens) == 50 and max(lens) == 100  # both ends reached with 2000 draws over 51 values
    assert ds.sample_lengths(rng(), 7, 1.0, 5) == [7] * 5
    assert set(ds.sample_lengths(rng(), 3, 0.0, 300)) == {1, 2, 3}
    with pytest.raises(ValueError):
        ds.sample_lengths(rng(), 10, 1.5, 1)


def test_random_ids_have_exact_lengths_and_no_special_tokens(tok):
    rows = ds.random_rows(tok, 20, 40, 12, 0.5, rng(3), as_ids=True)
    assert len(rows) == 20
    for row in rows:
        assert isinstance(row.prompt, list) and len(row.prompt) == row.prompt_len
        assert 20 <= row.prompt_len <= 40 and 6 <= row.output_len <= 12
        assert all(0 <= i < 256 for i in row.prompt)  # the byte tokenizer's 256 bytes, no 256..258
    again = ds.random_rows(tok, 20, 40, 12, 0.5, rng(3), as_ids=True)
    assert [r.prompt for r in again] == [r.prompt for r in rows]
    other = ds.random_rows(tok, 20, 40, 12, 0.5, rng(4), as_ids=True)
    assert [r.prompt for r in other] != [r.prompt for r in rows]


def test_random_text_rows_count_the_reencoded_prompt(tok):
    rows = ds.random_rows(tok, 10, 16, 8, 1.0, rng(1), as_ids=False)
    for row in rows:
        assert isinstance(row.prompt, str)
        assert row.prompt_len == len(tok.encode(row.prompt))
        assert row.prompt_len >= 16  # invalid UTF-8 bytes come back as 3-byte U+FFFD, never fewer
        assert row.output_len == 8


def test_generated_shared_prefix_structure(tok):
    rows = ds.generated_shared_prefix_rows(tok, 3, 4, 64, 8, 5, rng(7))
    assert len(rows) == 12
    assert all(r.output_len == 5 for r in rows)
    assert all(r.prompt_len == len(tok.encode(r.prompt)) for r in rows)
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r.prompt[:24], []).append(r.prompt)
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4]
    for prompts in groups.values():
        shared = os.path.commonprefix(prompts)
        # the whole system prompt (64 random bytes decode to >= 64 / 3 characters) is shared
        assert len(shared) >= 64 // 3
        assert len(set(prompts)) == 4  # questions differ
    keys = [r.prompt[:24] for r in rows]
    assert keys != sorted(keys, key=list(dict.fromkeys(keys)).index)  # shuffled, not group by group


def test_sharegpt_parsing_and_filters(tok):
    rows = ds.sharegpt_rows(tok, SHAREGPT, 10, rng(0), context_len=80)
    by_prompt = {r.prompt: r for r in rows}
    assert set(by_prompt) == {"What is the capital of France?", "Name a color.", "Say hello."}
    assert by_prompt["What is the capital of France?"].prompt_len == 30
    assert by_prompt["What is the capital of France?"].output_len == len("Paris is the capital.")
    assert by_prompt["Name a color."].output_len == len("Blue.")  # only the first two turns
    assert by_prompt["Say hello."].output_len == len("Hello there!")  # role/content records too
    fixed = ds.sharegpt_rows(tok, SHAREGPT, 10, rng(0), fixed_output_len=7, context_len=80)
    assert len(fixed) == 4 and all(r.output_len == 7 for r in fixed)  # the long one fits now
    assert len(ds.sharegpt_rows(tok, SHAREGPT, 2, rng(0))) == 2
    order_a = [r.prompt for r in ds.sharegpt_rows(tok, SHAREGPT, 10, rng(1))]
    order_b = [r.prompt for r in ds.sharegpt_rows(tok, SHAREGPT, 10, rng(1))]
    assert order_a == order_b and len(order_a) == 4
    with pytest.raises(FileNotFoundError):
        ds.sharegpt_rows(tok, SHAREGPT.with_name("missing.json"), 1, rng())


def test_apply_chat_template(tok):
    rows = [ds.DatasetRow("Hi", 2, 4)]
    sent = ds.apply_chat_template(rows, tok, send_templated=True)[0]
    assert sent.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"[len("<|im_start|>") :]
    kept = ds.apply_chat_template(rows, tok, send_templated=False)[0]
    assert kept.prompt == "Hi" and kept.prompt_len == len(tok.encode(sent.prompt)) and kept.output_len == 4
    with pytest.raises(TypeError):
        ds.apply_chat_template([ds.DatasetRow([1, 2], 2, 4)], tok, send_templated=True)


def test_arrival_offsets():
    assert arrival_offsets(4, float("inf"), rng()) == [0.0] * 4
    offs = arrival_offsets(4000, 50.0, rng(5))
    assert offs[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(offs))
    assert offs[-1] / 3999 == pytest.approx(1 / 50.0, rel=0.06)  # mean gap 1/rate
    assert arrival_offsets(4000, 50.0, rng(5)) == offs


# ---------------------------------------------------------------------- metrics


def _result(start, ttft, latency, output_len, itl, prompt_len=10, error=""):
    times = []
    if output_len:
        times.append((start + ttft, 1))
        t = start + ttft
        for gap in itl:
            t += gap
            times.append((t, 1))
    return RequestResult(
        success=not error, prompt_len=prompt_len, output_len=output_len, generated_text="ab" * output_len,
        start=start, ttft=ttft, latency=latency, itl=list(itl), token_times=times, error=error,
    )  # fmt: skip


def test_metrics_values():
    results = [
        _result(0.0, 0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1]),
        _result(0.5, 0.3, 1.5, 4, [0.4, 0.4, 0.4], prompt_len=20),
        _result(0.6, 0.0, 0.1, 0, [], error="HTTP 500: boom"),
        _result(0.7, 0.2, 0.2, 1, [], prompt_len=30),
    ]
    m = compute_metrics(results, duration_s=2.0)
    assert (m["completed"], m["failed"], m["first_error"]) == (3, 1, "HTTP 500: boom")
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 10)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["input_throughput"] == pytest.approx(30.0) and m["output_throughput"] == pytest.approx(5.0)
    assert m["total_throughput"] == pytest.approx(35.0)
    assert m["concurrency"] == pytest.approx((0.5 + 1.5 + 0.2) / 2.0)
    assert m["mean_e2e_latency_ms"] == pytest.approx(2200 / 3)
    assert m["median_e2e_latency_ms"] == pytest.approx(500.0)
    assert m["p99_e2e_latency_ms"] == pytest.approx(500 + 0.98 * 1000)  # linear between 500 and 1500
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(((0.4 / 4) + (1.2 / 3)) / 2 * 1000)  # 1-token request left out
    itl_ms = [100.0] * 4 + [400.0] * 3
    assert m["mean_itl_ms"] == pytest.approx(np.mean(itl_ms))
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p95_itl_ms"] == pytest.approx(np.percentile(itl_ms, 95))
    assert m["max_itl_ms"] == pytest.approx(400.0)
    # tokens at 0.1..0.5 (5), 0.8/1.2/1.6/2.0 (4), 0.9 (1): bin [0,1) holds 5 + 1 + 1
    assert m["max_output_tokens_per_s"] == 7.0
    assert m["max_concurrent_requests"] == 2  # 0.5..2.0 with 0.7..0.9; the first ends at 0.5 exactly


def test_metrics_of_nothing_are_zero():
    m = compute_metrics([], 1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["max_itl_ms"] == 0.0
    assert peak_tokens_per_s([]) == 0.0 and peak_concurrency([]) == 0


def test_retokenized_output_count(tok):
    m = compute_metrics([_result(0.0, 0.1, 0.2, 3, [0.05, 0.05])], 1.0, tokenizer=tok)
    assert m["total_output_tokens_retokenized"] == 6  # "ababab"


def test_stream_timer_spreads_multi_token_gaps():
    res = RequestResult(start=10.0)
    timer = StreamTimer(res)
    timer.tokens_arrived(10.2, 1)
    timer.tokens_arrived(10.5, 3)
    timer.tokens_arrived(10.5, 0)
    assert res.ttft == pytest.approx(0.2)
    assert res.itl == pytest.approx([0.1, 0.1, 0.1])
    assert res.token_times == [(10.2, 1), (10.5, 3)]


def test_report_block():
    m = compute_metrics([_result(0.0, 0.1, 0.5, 5, [0.1] * 4)], 1.0)
    text = format_report(m, "sglang", float("inf"), None)
    lines = [line.rstrip() for line in text.splitlines()]
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert "Successful requests:                     1" in lines
    assert any(line.startswith("Median TTFT (ms):") and line.split()[-1] == "100.00" for line in lines)
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert lines[-1] == "=" * 50


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


def test_output_line_has_settings_and_metrics():
    ns = build_parser().parse_args(["--num-prompts", "2", "--output-details"])
    results = [_result(0.0, 0.1, 0.5, 5, [0.1] * 4), _result(0.0, 0.1, 0.5, 0, [], error="x")]
    m = compute_metrics(results, 1.0)
    line = json.loads(json.dumps(result_line(ns, "m", "tok", m, results)))
    assert line["backend"] == "sglang" and line["request_rate"] == "inf" and line["num_prompts"] == 2
    assert line["completed"] == 1 and line["failed"] == 1 and line["errors"] == ["", "x"]
    assert line["output_lens"] == [5, 0] and "median_itl_ms" in line and "p99_ttft_ms" in line


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


def _dataset(tok, *flags: str) -> list[ds.DatasetRow]:
    from pdserve.bench.bench_serving import build_dataset

    ns = build_parser().parse_args(
        ["--num-prompts", "5", "--random-input-len", "12", "--random-output-len", "4", *flags]
    )
    return build_dataset(ns, tok)


def test_random_ids_send_text_unless_tokenize_prompt_as_sglangs_client(tok):
    text_rows = _dataset(tok, "--dataset-name", "random-ids")
    id_rows = _dataset(tok, "--dataset-name", "random-ids", "--tokenize-prompt")
    assert all(isinstance(r.prompt, str) for r in text_rows)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in id_rows)
    assert [tok.decode(r.prompt) for r in id_rows] == [r.prompt for r in text_rows]  # the same draws
    assert all(
        isinstance(r.prompt, str)
        for r in _dataset(tok, "--dataset-name", "random-ids", "--backend", "sglang-oai-chat")
    )
    with pytest.raises(SystemExit, match="--tokenize-prompt"):
        _dataset(tok, "--dataset-name", "random-ids", "--tokenize-prompt", "--backend", "sglang-oai-chat")


def test_random_takes_its_ids_from_sharegpt_prompts(tok):
    rows = _dataset(tok, "--dataset-name", "random", "--dataset-path", str(SHAREGPT), "--tokenize-prompt")
    turns = [ds._first_two_turns(r) for r in json.loads(SHAREGPT.read_text()) if isinstance(r, dict)]
    prompts = [tok.encode(t[0], add_special_tokens=False) for t in turns if t is not None]
    assert len(rows) == 5
    for row in rows:
        assert len(row.prompt) == row.prompt_len and 1 <= row.prompt_len <= 12
        # each row is one prompt's ids, repeated or cut to the drawn length
        assert any(row.prompt == (p * (row.prompt_len // len(p) + 1))[: row.prompt_len] for p in prompts if p)
