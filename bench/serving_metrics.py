"""Metrics of a `bench_serving` run and SGLang's printout of them.

Rules (all latencies in the printout and the output file are milliseconds; totals count successful
requests only):
- request/input/output/total throughput = the successful requests' counts / benchmark duration;
- percentiles are numpy's (linear interpolation), as SGLang's; empty lists give 0.0;
- TPOT of a request = (latency - ttft) / (output_len - 1), for requests with more than one token;
- ITL values are every request's inter-token gaps pooled together;
- concurrency = sum of successful latencies / duration (the mean number of requests in flight);
- peak output throughput = the most tokens that arrived within one 1-second bin of the run
  (bins counted from the earliest request start); peak concurrent requests = the most requests
  whose [start, start + latency] intervals overlap at one instant.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from pdserve.bench.serving_backends import RequestResult


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def std(values: list[float]) -> float:
    return float(np.std(values)) if values else 0.0


def peak_tokens_per_s(results: list[RequestResult]) -> float:
    """The most output tokens arriving within one 1-second bin (see the module docstring)."""
    if not results:
        return 0.0
    origin = min(r.start for r in results)
    bins: Counter[int] = Counter()
    for r in results:
        for t, n in r.token_times:
            bins[int(t - origin)] += n
    return float(max(bins.values(), default=0))


def peak_concurrency(results: list[RequestResult]) -> int:
    """The most requests in flight at one instant (an end at t is counted before a start at t)."""
    events = sorted([(r.start, 1) for r in results] + [(r.start + r.latency, -1) for r in results])
    best = running = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def _latency_stats(prefix: str, values_s: list[float], qs: tuple[int, ...]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    out = {
        f"mean_{prefix}_ms": mean(ms),
        f"median_{prefix}_ms": percentile(ms, 50),
        f"std_{prefix}_ms": std(ms),
    }
    for q in qs:
        out[f"p{q}_{prefix}_ms"] = percentile(ms, q)
    return out


def compute_metrics(results: list[RequestResult], duration_s: float, tokenizer=None) -> dict[str, Any]:
    """The run's metrics (keys as SGLang's output file names them, plus `failed` and `first_error`)."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    duration_s = max(duration_s, 1e-9)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [gap for r in ok for gap in r.itl]
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(failed),
        "first_error": failed[0].error if failed else "",
        "duration": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "input_throughput": total_input / duration_s,
        "output_throughput": total_output / duration_s,
        "total_throughput": (total_input + total_output) / duration_s,
        "max_output_tokens_per_s": peak_tokens_per_s(ok),
        "max_concurrent_requests": peak_concurrency(ok),
        "concurrency": sum(r.latency for r in ok) / duration_s,
    }
    if tokenizer is not None:
        retok = sum(len(tokenizer.encode(r.generated_text, add_special_tokens=False)) for r in ok)
        metrics["total_output_tokens_retokenized"] = retok
        metrics["output_throughput_retokenized"] = retok / duration_s
    metrics |= _latency_stats("e2e_latency", [r.latency for r in ok], (90, 99))
    metrics |= _latency_stats("ttft", [r.ttft for r in ok], (99,))
    metrics |= _latency_stats("tpot", tpots, (99,))
    metrics |= _latency_stats("itl", itls, (95, 99))
    metrics["max_itl_ms"] = max(itls) * 1000.0 if itls else 0.0
    return metrics


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def _section(title: str) -> str:
    return f"{title:-^50}"


def format_report(
    metrics: dict[str, Any], backend: str, request_rate: float, max_concurrency: int | None
) -> str:
    """SGLang's "Serving Benchmark Result" block."""
    m = metrics
    lines = [
        f"{' Serving Benchmark Result ':=^50}",
        _row("Backend:", backend),
        _row("Traffic request rate:", "inf" if request_rate == float("inf") else request_rate),
        _row("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        _row("Successful requests:", m["completed"]),
        _row("Failed requests:", m["failed"]),
        _row("Benchmark duration (s):", m["duration"]),
        _row("Total input tokens:", m["total_input_tokens"]),
        _row("Total generated tokens:", m["total_output_tokens"]),
    ]
    if "total_output_tokens_retokenized" in m:
        lines.append(_row("Total generated tokens (retokenized):", m["total_output_tokens_retokenized"]))
    lines += [
        _row("Request throughput (req/s):", m["request_throughput"]),
        _row("Input token throughput (tok/s):", m["input_throughput"]),
        _row("Output token throughput (tok/s):", m["output_throughput"]),
        _row("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"]),
        _row("Peak concurrent requests:", m["max_concurrent_requests"]),
        _row("Total token throughput (tok/s):", m["total_throughput"]),
        _row("Concurrency:", m["concurrency"]),
        _section("End-to-End Latency"),
        _row("Mean E2E Latency (ms):", m["mean_e2e_latency_ms"]),
        _row("Median E2E Latency (ms):", m["median_e2e_latency_ms"]),
        _row("P99 E2E Latency (ms):", m["p99_e2e_latency_ms"]),
        _section("Time to First Token"),
        _row("Mean TTFT (ms):", m["mean_ttft_ms"]),
        _row("Median TTFT (ms):", m["median_ttft_ms"]),
        _row("P99 TTFT (ms):", m["p99_ttft_ms"]),
        _section("Time per Output Token (excl. 1st token)"),
        _row("Mean TPOT (ms):", m["mean_tpot_ms"]),
        _row("Median TPOT (ms):", m["median_tpot_ms"]),
        _row("P99 TPOT (ms):", m["p99_tpot_ms"]),
        _section("Inter-Token Latency"),
        _row("Mean ITL (ms):", m["mean_itl_ms"]),
        _row("Median ITL (ms):", m["median_itl_ms"]),
        _row("P95 ITL (ms):", m["p95_itl_ms"]),
        _row("P99 ITL (ms):", m["p99_itl_ms"]),
        _row("Max ITL (ms):", m["max_itl_ms"]),
        "=" * 50,
    ]
    if m["failed"]:
        lines.append(f"{m['failed']} request(s) failed; first error: {m['first_error']}")
    return "\n".join(lines)
