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
  (router/serving/admission.py), `queue_time_seconds`: how long each admitted request waited there, and
  `queue_rejections_total{reason}`: prompts answered 429 by it (`queue_full`, or `evicted` by a
  request of higher priority);
- `worker_failures_total{worker}` (server-side failures seen by dispatch) and `retries_total`
  (requests moved to another worker);
- per worker: `worker_load{worker}` (queued + running, as last seen), `worker_inflight{worker}`
  (this router's requests on it), `worker_up{worker}` (1 while it is live, whatever its role: a
  prefill worker too; with no cluster attached, the caller's flag), `worker_circuit_state{worker}`
  (0 open, 1 half-open, 2 closed) — refreshed at each scrape.

Beside them, SGLang's names (`sglang:*`, label `model_name`: router/serving/sglang_metrics.py): the same
request histograms and token counters, in SGLang's buckets, and the cluster's scheduler gauges
summed from the workers' load reports. They need to know the served model and the workers:
`attach(ClusterOfState(state))` (router/cli.py does it once the app is built); without it only the
`pdserve_router_*` series are served. `ttft` and `itl` are observed once and feed both namings.

With `router --processes N` (router/processes.py) a scrape reaches one process, so every process
keeps its values in prometheus_client's files under PROMETHEUS_MULTIPROC_DIR and the scrape sums
them: counters and histograms over all processes; gauges by their `multiprocess_mode` (requests
running, queued and on a worker summed over live processes; a worker's load and up the highest any
process saw, its circuit the most open); `cache_hit_rate` computed from the summed token counters
(a ratio does not sum; SGLang's `sglang:cache_hit_rate` likewise); SGLang's cluster gauges the
most recent value (every process computes the same sums). Each process refreshes its worker gauges
every second (router/cli.py), as the scrape refreshes only its own. A worker gone keeps its last gauges there while the processes
live (the files are never rewritten). No `_created` samples in that mode (prometheus_client's rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pdserve.router.serving import sglang_metrics as sglang
from pdserve.router.serving.sglang_metrics import ClusterLoad, Labelled, SglangRouterSeries, WorkerLoad

if TYPE_CHECKING:
    from pdserve.router.state import RouterState

PREFIX = "pdserve_router"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ClusterSource(Protocol):
    """What the metrics read of the cluster at a refresh: the served model, and each worker."""

    @property
    def model_name(self) -> str: ...

    def worker_loads(self) -> list[WorkerLoad]: ...


class ClusterOfState:
    """The cluster as a running router's state knows it."""

    def __init__(self, state: RouterState):
        self._state = state

    @property
    def model_name(self) -> str:
        return self._state.model_name

    def worker_loads(self) -> list[WorkerLoad]:
        return [
            WorkerLoad(h.worker_id, h.role, h.live, h.last_load, h.gen_throughput)
            for h in self._state.pool.workers.values()
        ]


class _PairedHistogram:
    """pdserve's histogram and SGLang's of the served model: one observe() feeds both. The
    router observes `metrics.ttft` and `metrics.itl` on every output, so the SGLang child is kept
    here once known; `resolve()` finds it (None while the served model is unknown)."""

    __slots__ = ("_own", "_resolve", "child")

    def __init__(self, own: Histogram, resolve: Callable[[], Histogram | None]):
        self._own = own
        self._resolve = resolve
        self.child: Histogram | None = None

    def observe(self, value: float) -> None:
        self._own.observe(value)
        child = self.child
        if child is None:
            child = self.child = self._resolve()
            if child is None:
                return
        child.observe(value)


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
        self.sglang = SglangRouterSeries(r)
        self._cluster: ClusterSource | None = None
        self._labelled: tuple[str, Labelled] | None = None  # the SGLang children of the served model
        ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between outputs", buckets=_ITL_BUCKETS, registry=r
        )
        self.ttft = _PairedHistogram(ttft, lambda: lab.ttft if (lab := self._sglang_children()) else None)
        self.itl = _PairedHistogram(itl, lambda: lab.itl if (lab := self._sglang_children()) else None)
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

    # ------------------------------------------------------------------ the cluster

    def attach(self, cluster: ClusterSource) -> None:
        """Where the SGLang series learn the served model and the workers (module docstring)."""
        self._cluster = cluster
        self._forget_children()

    def _forget_children(self) -> None:
        self._labelled = None
        self.ttft.child = self.itl.child = None

    def _sglang_children(self) -> Labelled | None:
        """The SGLang series' children of the served model; None while it is not known. Kept
        between calls (every completed request asks)."""
        if self._labelled is not None:
            return self._labelled[1]
        if self._cluster is None or not self._cluster.model_name:
            return None
        name = self._cluster.model_name
        self._labelled = (name, self.sglang.labelled(name))
        return self._labelled[1]

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
        labelled = self._sglang_children()
        if labelled is not None:
            labelled.e2e.observe(e2e_s)
            labelled.prompt_tokens.inc(prompt_tokens)
            labelled.generation_tokens.inc(completion_tokens)
            if cached_tokens:  # as SGLang: the series appears with the first cached token
                labelled.cached_tokens.inc(cached_tokens)
            labelled.num_requests.inc()
            if self._prompt_total:
                self.sglang.cache_hit_rate.labels(self._labelled[0]).set(
                    self._cached_total / self._prompt_total
                )

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
        """rows: (worker_id, load, inflight, up, circuit_state); workers gone since are dropped.
        With a cluster attached, `up` is the worker's liveness (any role) and the SGLang cluster
        gauges are refreshed too."""
        loads = self._cluster.worker_loads() if self._cluster is not None else None
        live = {w.worker_id for w in loads if w.live} if loads is not None else None
        seen = set()
        for worker_id, load, inflight, up, circuit in rows:
            seen.add(worker_id)
            self.worker_load.labels(worker_id).set(load)
            self.worker_inflight.labels(worker_id).set(inflight)
            self.worker_up.labels(worker_id).set(1 if (worker_id in live if live is not None else up) else 0)
            self.worker_circuit.labels(worker_id).set(circuit)
        for gone in self._known_workers - seen:
            for gauge in (self.worker_load, self.worker_inflight, self.worker_up, self.worker_circuit):
                gauge.remove(gone)
        self._known_workers = seen
        if loads is not None:
            self._refresh_cluster(loads)

    def _refresh_cluster(self, loads: list[WorkerLoad]) -> None:
        name = self._cluster.model_name if self._cluster is not None else ""
        if not name:
            return
        if self._labelled is not None and self._labelled[0] != name:
            self._forget_children()  # the served model changed: observe under the new name
        self.sglang.set_cluster(name, ClusterLoad.of(loads))


class _SummedOverProcesses:
    """Every process's values from the files (prometheus_client's MultiProcessCollector), with
    `cache_hit_rate` (pdserve's, and SGLang's per model) recomputed from the summed prompt and
    cached token counters."""

    def __init__(self, path: str):
        self._files = MultiProcessCollector(None, path)  # None: registered by the caller, not globally

    def collect(self) -> Iterator[Metric]:
        families = list(self._files.collect())
        totals = {f.name: sum(s.value for s in f.samples if s.name.endswith("_total")) for f in families}
        by_model = {f.name: _totals_by_model(f) for f in families if f.name.startswith("sglang:")}
        for family in families:
            if family.name == f"{PREFIX}_cache_hit_rate":
                prompt = totals.get(f"{PREFIX}_prompt_tokens", 0.0)
                cached = totals.get(f"{PREFIX}_cached_tokens", 0.0)
                yield GaugeMetricFamily(
                    family.name, family.documentation, value=cached / prompt if prompt else 0.0
                )
            elif family.name == sglang.CACHE_HIT_RATE:
                rates = GaugeMetricFamily(family.name, family.documentation, labels=sglang.LABELS)
                prompt = by_model.get(sglang.PROMPT_TOKENS, {})
                cached = by_model.get(sglang.CACHED_TOKENS, {})
                for model, tokens in prompt.items():
                    rates.add_metric([model], cached.get(model, 0.0) / tokens if tokens else 0.0)
                yield rates
            else:
                yield family


def _totals_by_model(family: Metric) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in family.samples:
        if s.name.endswith("_total"):
            model = s.labels.get("model_name", "")
            out[model] = out.get(model, 0.0) + s.value
    return out
