"""One worker's metrics under SGLang's names, so a dashboard made for an SGLang server reads a
pdserve worker unchanged (shared/worker/metrics.py feeds them; pdserve_worker_* stay beside them).

    series = SglangWorkerSeries(registry, model_name="Qwen/Qwen2.5-7B", role="decode")
    series.set_load(load_report, gen_throughput=812.5, cache_hit_rate=0.4)
    series.count({"prompt_tokens": 120, "generated_tokens": 64})   # EngineStats field -> increase
    series.set_latency(latencies)                                  # RequestLatencies since the baseline

Names, types and labels are SGLang's (sglang/srt/metrics/collector.py, 0.5.3):
- gauges, labels model_name, engine_type, tp_rank, pp_rank (a scheduler's): `sglang:num_running_reqs`,
  `sglang:num_queue_reqs`, `sglang:num_used_tokens`, `sglang:token_usage`, `sglang:gen_throughput`,
  `sglang:cache_hit_rate`; engine_type is the role ("unified" for mixed, as SGLang names a server
  that does both), tp_rank and pp_rank are "0" (a worker is one rank);
- counters, label model_name (a tokenizer manager's): `sglang:prompt_tokens_total`,
  `sglang:generation_tokens_total`, `sglang:cached_tokens_total`, `sglang:num_requests_total`
  (samples finished, aborted included, as SGLang counts finished requests),
  `sglang:num_aborted_requests_total`;
- histograms, label model_name, in SGLang's buckets: `sglang:time_to_first_token_seconds`,
  `sglang:inter_token_latency_seconds`, `sglang:e2e_request_latency_seconds`, measured by the
  engine from the moment it accepted a request (shared/engine/latency_stats.py).

Threading: the loop thread calls the setters; the HTTP thread renders. Gauges and counters guard
their values; the histograms are a reference to an immutable copy, swapped whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from pdserve.shared.engine.latency_stats import LatencyHistogram, RequestLatencies
from pdserve.shared.protocol import LoadReport

ENGINE_TYPES = {"mixed": "unified", "prefill": "prefill", "decode": "decode"}

# EngineStats field -> (counter name without `sglang:` and `_total`, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "prompt_tokens": ("prompt_tokens", "Number of prefill tokens processed."),
    "generated_tokens": ("generation_tokens", "Number of generation tokens processed."),
    "cached_tokens": ("cached_tokens", "Number of cached prompt tokens."),
    "num_finished": ("num_requests", "Number of requests processed."),
    "num_aborted": ("num_aborted_requests", "Number of requests aborted."),
}

# RequestLatencies field -> (histogram name without `sglang:`, help)
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "ttft": ("time_to_first_token_seconds", "Histogram of time to first token in seconds."),
    "itl": ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds."),
    "e2e": ("e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds"),
}


class SglangWorkerSeries:
    def __init__(self, registry: CollectorRegistry, model_name: str, role: str):
        r = registry
        scheduler = {
            "model_name": model_name,
            "engine_type": ENGINE_TYPES.get(role, role),
            "tp_rank": "0",
            "pp_rank": "0",
        }

        def gauge(name: str, text: str):
            return Gauge(f"sglang:{name}", text, list(scheduler), registry=r).labels(**scheduler)

        self.num_running = gauge("num_running_reqs", "The number of running requests.")
        self.num_queue = gauge("num_queue_reqs", "The number of requests in the waiting queue.")
        self.num_used_tokens = gauge("num_used_tokens", "The number of used tokens.")
        self.token_usage = gauge("token_usage", "The token usage.")
        self.gen_throughput = gauge("gen_throughput", "The generation throughput (token/s).")
        self.cache_hit_rate = gauge("cache_hit_rate", "The prefix cache hit rate.")
        self.counters = {
            key: Counter(f"sglang:{name}", text, ["model_name"], registry=r).labels(model_name)
            for key, (name, text) in COUNTERS.items()
        }
        self._latency = _LatencyFamilies(model_name)
        r.register(self._latency)

    def set_load(self, load: LoadReport, gen_throughput: float | None, cache_hit_rate: float) -> None:
        """gen_throughput None: keep the last value (the rate is measured over windows)."""
        self.num_running.set(load.num_running)
        self.num_queue.set(load.num_waiting)
        self.num_used_tokens.set(load.num_used_tokens)
        self.token_usage.set(
            load.num_used_tokens / load.max_total_num_tokens if load.max_total_num_tokens else 0.0
        )
        if gen_throughput is not None:
            self.gen_throughput.set(gen_throughput)
        self.cache_hit_rate.set(cache_hit_rate)

    def count(self, increases: Mapping[str, float]) -> None:
        """EngineStats field -> how much it grew (fields without an SGLang counter are ignored)."""
        for key, counter in self.counters.items():
            delta = increases.get(key, 0)
            if delta > 0:
                counter.inc(delta)

    def set_latency(self, latencies: RequestLatencies) -> None:
        self._latency.latencies = latencies


class _LatencyFamilies:
    """A collector of the three histograms, from the last RequestLatencies handed to it."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.latencies = RequestLatencies()

    def collect(self) -> Iterator[Metric]:
        latencies = self.latencies  # one read: the loop thread swaps the whole object
        for key, (name, text) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"sglang:{name}", text, labels=["model_name"])
            hist = getattr(latencies, key)
            family.add_metric([self.model_name], _buckets(hist), hist.sum)
            yield family


def _buckets(hist: LatencyHistogram) -> list[tuple[str, float]]:
    cumulative = hist.cumulative()
    bounds = [floatToGoString(b) for b in hist.bounds] + ["+Inf"]
    return list(zip(bounds, cumulative))
