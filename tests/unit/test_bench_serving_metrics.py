"""bench_serving's metrics without a server: the values computed from request results, the stream
timer, the report block and the JSON output line."""

import json
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench.bench_serving import build_parser, result_line
from pdserve.bench.serving_backends import (
    RequestResult,
    StreamTimer,
)
from pdserve.bench.serving_metrics import compute_metrics, format_report, peak_concurrency, peak_tokens_per_s

SHAREGPT = Path(__file__).parent / "data" / "sharegpt_small.json"


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


def test_output_line_has_settings_and_metrics():
    ns = build_parser().parse_args(["--num-prompts", "2", "--output-details"])
    results = [_result(0.0, 0.1, 0.5, 5, [0.1] * 4), _result(0.0, 0.1, 0.5, 0, [], error="x")]
    m = compute_metrics(results, 1.0)
    line = json.loads(json.dumps(result_line(ns, "m", "tok", m, results)))
    assert line["backend"] == "sglang" and line["request_rate"] == "inf" and line["num_prompts"] == 2
    assert line["completed"] == 1 and line["failed"] == 1 and line["errors"] == ["", "x"]
    assert line["output_lens"] == [5, 0] and "median_itl_ms" in line and "p99_ttft_ms" in line
