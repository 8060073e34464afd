"""The router's metrics under SGLang's names: the cluster seen as one SGLang server, so a Grafana
dashboard made for SGLang reads a pdserve router unchanged (router/serving/metrics.py owns and feeds them).

    series = SglangRouterSeries(registry)
    series.labelled("Qwen/Qwen2.5-7B").ttft.observe(0.21)      # per request, by the served model
    series.set_cluster("Qwen/Qwen2.5-7B", ClusterLoad.of(worker_loads))   # at each refresh

Names, types, buckets and the `model_name` label are SGLang's (sglang/srt/metrics/collector.py,
0.5.3), the label's value being the served model name (what OpenAI responses call `model`):
- from the router's own requests (what SGLang's tokenizer manager counts): the histograms
  `sglang:time_to_first_token_seconds`, `sglang:inter_token_latency_seconds` (one observation per
  output) and `sglang:e2e_request_latency_seconds`, in SGLang's default buckets; the counters
  `sglang:prompt_tokens_total`, `sglang:generation_tokens_total`, `sglang:cached_tokens_total`,
  `sglang:num_requests_total` (requests that completed);
- from the workers' load reports (what SGLang's scheduler reports), summed over the live workers,
  so they equal the sum of the workers' own `sglang:*` gauges (shared/worker/sglang_metrics.py):
  `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:num_used_tokens`, and
  `sglang:token_usage` (used over all workers' KV tokens); `sglang:gen_throughput` sums the mixed
  and decode workers only (a prefill worker's first token is streamed again by its decode worker);
- `sglang:cache_hit_rate`: cached over prompt tokens of the router's completed requests, since start.

With `router --processes N` every process computes the cluster gauges from the same load reports,
so the scrape takes the most recent (`livemostrecent`); counters and histograms sum over the
processes; `cache_hit_rate` is recomputed from the summed counters (router/serving/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.shared.engine.latency_stats import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS
from pdserve.shared.protocol import LoadReport

LABELS = ["model_name"]
GENERATE_ROLES = ("mixed", "decode")  # the roles that stream tokens to the router
PROMPT_TOKENS = "sglang:prompt_tokens"  # counter family names (samples end in _total)
CACHED_TOKENS = "sglang:cached_tokens"
CACHE_HIT_RATE = "sglang:cache_hit_rate"


@dataclass(frozen=True)
class WorkerLoad:
    """What the router last heard from one worker."""

    worker_id: str
    role: str
    live: bool
    load: LoadReport | None  # its last load report; None before the first
    gen_throughput: float = 0.0  # tokens/s between its last two load reports


@dataclass(frozen=True)
class ClusterLoad:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    gen_throughput: float = 0.0

    @property
    def token_usage(self) -> float:
        return self.num_used_tokens / self.max_total_num_tokens if self.max_total_num_tokens else 0.0

    @classmethod
    def of(cls, workers: list[WorkerLoad]) -> ClusterLoad:
        """The sums over the live workers that reported their load (module docstring)."""
        reported = [w for w in workers if w.live and w.load is not None]
        return cls(
            num_running_reqs=sum(w.load.num_running for w in reported),
            num_queue_reqs=sum(w.load.num_waiting for w in reported),
            num_used_tokens=sum(w.load.num_used_tokens for w in reported),
            max_total_num_tokens=sum(w.load.max_total_num_tokens for w in reported),
            gen_throughput=sum(w.gen_throughput for w in reported if w.role in GENERATE_ROLES),
        )


@dataclass(frozen=True)
class Labelled:
    """The series' children for one model name: what a request's observations go to."""

    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    cached_tokens: Counter
    num_requests: Counter


class SglangRouterSeries:
    def __init__(self, registry: CollectorRegistry):
        r = registry

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sglang:{name}", text, LABELS, buckets=buckets, registry=r)

        def counter(name: str, text: str) -> Counter:
            return Counter(f"sglang:{name}", text, LABELS, registry=r)

        def gauge(name: str, text: str, mode: str = "livemostrecent") -> Gauge:
            return Gauge(f"sglang:{name}", text, LABELS, registry=r, multiprocess_mode=mode)

        self._ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self._itl = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self._e2e = histogram(
            "e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", E2E_BUCKETS
        )
        self._prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self._cached_tokens = counter("cached_tokens", "Number of cached prompt tokens.")
        self._num_requests = counter("num_requests", "Number of requests processed.")
        self.num_running_reqs = gauge("num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge("num_queue_reqs", "The number of requests in the waiting queue.")
        self.num_used_tokens = gauge("num_used_tokens", "The number of used tokens.")
        self.token_usage = gauge("token_usage", "The token usage.")
        self.gen_throughput = gauge("gen_throughput", "The generation throughput (token/s).")
        # replaced at the scrape with --processes N (a ratio does not sum): router/serving/metrics.py
        self.cache_hit_rate = gauge("cache_hit_rate", "The prefix cache hit rate.", mode="livemax")

    def labelled(self, model_name: str) -> Labelled:
        return Labelled(
            *(
                series.labels(model_name)
                for series in (
                    self._ttft,
                    self._itl,
                    self._e2e,
                    self._prompt_tokens,
                    self._generation_tokens,
                    self._cached_tokens,
                    self._num_requests,
                )
            )
        )

    def set_cluster(self, model_name: str, cluster: ClusterLoad) -> None:
        self.num_running_reqs.labels(model_name).set(cluster.num_running_reqs)
        self.num_queue_reqs.labels(model_name).set(cluster.num_queue_reqs)
        self.num_used_tokens.labels(model_name).set(cluster.num_used_tokens)
        self.token_usage.labels(model_name).set(cluster.token_usage)
        self.gen_throughput.labels(model_name).set(cluster.gen_throughput)
