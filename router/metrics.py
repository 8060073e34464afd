"""The router's Prometheus metrics, in a registry of its own (never prometheus_client's global one).

Names (prefix `pdserve_router_`):
- `requests_total{route,code}`, `request_errors_total{route,code}` (code >= 400): every HTTP request,
  `route` being the matched route's path (unmatched paths count as "other", so a scanner cannot
  blow up the label set);
- `time_to_first_token_seconds`, `inter_token_latency_seconds`, `e2e_request_latency_seconds`:
  histograms over generation requests (native and OpenAI alike);
- `prompt_tokens_total`, `generation_tokens_total`, `cached_tokens_total`, and the gauge
  `cache_hit_rate` (cached / prompt tokens since start);
- `generation_requests_running`: requests in flight through this router (admitted: running on
  workers); `generation_requests_queued`: requests waiting in the router's admission queue
  (router/admission.py), `queue_time_seconds`: how long each admitted request waited there, and
  `queue_rejections_total{reason}`: prompts answered 429 by it (`queue_full`, or `evicted` by a
  request of higher priority);
- `worker_failures_total{worker}` (server-side failures seen by dispatch) and `retries_total`
  (requests moved to another worker);
- per worker: `worker_load{worker}` (queued + running, as last seen), `worker_inflight{worker}`
  (this router's requests on it), `worker_up{worker}` (1 when it can take requests),
  `worker_circuit_state{worker}` (0 open, 1 half-open, 2 closed) — refreshed at each scrape.

With `router --processes N` (router/processes.py) a scrape reaches one process, so every process
keeps its values in prometheus_client's files under PROMETHEUS_MULTIPROC_DIR and the scrape sums
them: counters and histograms over all processes; gauges by their `multiprocess_mode` (requests
running, queued and on a worker summed over live processes; a worker's load and up the highest any
process saw, its circuit the most open); `cache_hit_rate` computed from the summed token counters
(a ratio does not sum). Each process refreshes its worker gauges every second (router/cli.py), as
the scrape refreshes only its own. A worker gone keeps its last gauges there while the processes
live (the files are never rewritten). No `_created` samples in that mode (prometheus_client's rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "pdserve_router"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


class RouterMetrics:
    def __init__(self) -> None:
        # prometheus_client itself chose file-backed values at import when this is set: follow it.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests", ["route", "code"], registry=r)
        self.errors = Counter(
            f"{PREFIX}_request_errors", "HTTP requests answered >= 400", ["route", "code"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between outputs", buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Whole generation request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_cached_tokens", "Prompt tokens served from cache", registry=r)
        self.cache_hit_rate = Gauge(
            f"{PREFIX}_cache_hit_rate",
            "Cached / prompt tokens since start",
            registry=r,
            multiprocess_mode="livemax",  # replaced at the scrape (_SummedOverProcesses)
        )
        self.running = Gauge(
            f"{PREFIX}_generation_requests_running",
            "Requests in flight",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            f"{PREFIX}_generation_requests_queued",
            "Requests in the router's admission queue",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_time = Histogram(
            f"{PREFIX}_queue_time_seconds",
            "Time waited in the router's admission queue",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_rejections = Counter(
            f"{PREFIX}_queue_rejections",
            "Prompts answered 429 by the admission queue",
            ["reason"],
            registry=r,
        )
        self.worker_failures = Counter(
            f"{PREFIX}_worker_failures", "Server-side worker failures", ["worker"], registry=r
        )
        self.retries = Counter(f"{PREFIX}_retries", "Requests moved to another worker", registry=r)
        self.migrations = Counter(
            f"{PREFIX}_migrations",
            "Streams moved to another worker after tokens reached the client (a subset of retries)",
            registry=r,
        )
        self.worker_load = Gauge(
            f"{PREFIX}_worker_load",
            "Queued + running requests",
            ["worker"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.worker_inflight = Gauge(
            f"{PREFIX}_worker_inflight",
            "This router's requests on the worker",
            ["worker"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_up = Gauge(
            f"{PREFIX}_worker_up",
            "1 when the worker can take requests",
            ["worker"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.worker_circuit = Gauge(
            f"{PREFIX}_worker_circuit_state",
            "0 open, 1 half-open, 2 closed",
            ["worker"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self._prompt_total = 0
        self._cached_total = 0
        self._known_workers: set[str] = set()

    # ------------------------------------------------------------------ HTTP

    def observe_http(self, route: str, code: int) -> None:
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()

    # ------------------------------------------------------------------ generation

    def observe_request_done(
        self, e2e_s: float, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> None:
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens
        if self._prompt_total:
            self.cache_hit_rate.set(self._cached_total / self._prompt_total)

    # ------------------------------------------------------------------ scrape

    def render(self, refresh_workers: Callable[[RouterMetrics], None] | None = None) -> bytes:
        if refresh_workers is not None:
            refresh_workers(self)
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        summed = CollectorRegistry()
        summed.register(_SummedOverProcesses(self.multiprocess_dir))
        return generate_latest(summed)

    def set_workers(self, rows: list[tuple[str, int, int, bool, int]]) -> None:
        """rows: (worker_id, load, inflight, up, circuit_state); workers gone since are dropped."""
        seen = set()
        for worker_id, load, inflight, up, circuit in rows:
            seen.add(worker_id)
            self.worker_load.labels(worker_id).set(load)
            self.worker_inflight.labels(worker_id).set(inflight)
            self.worker_up.labels(worker_id).set(1 if up else 0)
            self.worker_circuit.labels(worker_id).set(circuit)
        for gone in self._known_workers - seen:
            for gauge in (self.worker_load, self.worker_inflight, self.worker_up, self.worker_circuit):
                gauge.remove(gone)
        self._known_workers = seen


class _SummedOverProcesses:
    """Every process's values from the files (prometheus_client's MultiProcessCollector), with
    `cache_hit_rate` recomputed from the summed prompt and cached token counters."""

    def __init__(self, path: str):
        self._files = MultiProcessCollector(None, path)  # None: registered by the caller, not globally

    def collect(self) -> Iterator[Metric]:
        families = list(self._files.collect())
        totals = {f.name: sum(s.value for s in f.samples if s.name.endswith("_total")) for f in families}
        for family in families:
            if family.name == f"{PREFIX}_cache_hit_rate":
                prompt = totals.get(f"{PREFIX}_prompt_tokens", 0.0)
                cached = totals.get(f"{PREFIX}_cached_tokens", 0.0)
                yield GaugeMetricFamily(
                    family.name, family.documentation, value=cached / prompt if prompt else 0.0
                )
            else:
                yield family
