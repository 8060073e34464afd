"""Prometheus metrics of one worker, in a registry of its own (never prometheus_client's global one).

Threading rule: only the loop thread reads the engine. It takes an `EngineSnapshot` (plain numbers)
and hands it to `WorkerMetrics.publish`; the HTTP thread only renders the registry, whose metric
objects guard their values with their own locks. So the HTTP thread never touches the engine.

Counters mirror the engine's monotonic `EngineStats` by adding the difference since the previous
snapshot; the first snapshot (taken after the warm-up) is the baseline, so warm-up traffic is not
counted (nor in the latency histograms). Throughput gauges are wall-clock rates over the last
window of at least `window_s`.

Beside the `pdserve_worker_*` series, the same snapshot feeds SGLang's (`sglang:*` with a
`model_name` label: sglang_metrics.py), so an SGLang dashboard reads a worker unchanged.

This module imports no torch (the engine's types only for annotations): whoever imports it for
the registry (the HTTP server, `serve` reading the worker's flags) need not wait for torch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.shared.engine.latency_stats import RequestLatencies
from pdserve.shared.protocol import LoadReport
from pdserve.shared.worker.sglang_metrics import SglangWorkerSeries

if TYPE_CHECKING:
    from pdserve.shared.engine.engine_stats import EngineStats

PREFIX = "pdserve_worker"


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything /metrics shows, read from the engine in the loop thread: its load report and
    copies of its monotonic counters (EngineStats) and latency histograms (RequestLatencies)."""

    load: LoadReport
    stats: EngineStats
    latency: RequestLatencies = field(default_factory=RequestLatencies)

    @classmethod
    def of(cls, engine) -> EngineSnapshot:
        """Reads the engine; call only from the thread that drives it."""
        return cls(load=engine.load(), stats=dataclasses.replace(engine.stats), latency=engine.latency.copy())


# EngineStats field -> (counter name without prefix/_total, help)
_COUNTERS: dict[str, tuple[str, str]] = {
    "num_requests": ("requests", "Generate requests accepted by the engine."),
    "num_finished": ("finished_samples", "Samples that finished (any reason, aborts included)."),
    "num_aborted": ("aborted_samples", "Samples aborted by a client, the pool or shutdown."),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of accepted requests (times n)."),
    "cached_tokens": ("cached_tokens", "Prompt tokens served from the radix cache."),
    "generated_tokens": ("generation_tokens", "Output tokens sent to clients."),
    "prefill_tokens_computed": ("prefill_tokens_computed", "Tokens computed in extend (prefill) batches."),
    "decode_tokens_computed": ("decode_tokens_computed", "Tokens computed in decode batches."),
    "prefill_seconds": ("prefill_seconds", "Seconds spent in extend (prefill) forward passes."),
    "decode_seconds": ("decode_seconds", "Seconds spent in decode forward passes."),
    "num_retractions": ("retractions", "Requests retracted because decode ran out of KV pages."),
    "jump_forward_tokens": ("jump_forward_tokens", "Output tokens a grammar forced (jump-forward decoding)."),
}


class WorkerMetrics:
    def __init__(self, role: str, model: str, window_s: float = 1.0):
        self.registry = CollectorRegistry(auto_describe=True)
        self.window_s = window_s
        r = self.registry
        Info(f"{PREFIX}", "Worker identity.", registry=r).info({"role": role, "model": model})
        self.num_waiting = Gauge(
            f"{PREFIX}_num_waiting_reqs", "Requests queued, not admitted yet.", registry=r
        )
        self.num_running = Gauge(f"{PREFIX}_num_running_reqs", "Requests prefilling or decoding.", registry=r)
        self.used_tokens = Gauge(f"{PREFIX}_num_used_tokens", "KV tokens held by live requests.", registry=r)
        self.total_tokens = Gauge(f"{PREFIX}_max_total_num_tokens", "KV pool capacity in tokens.", registry=r)
        self.token_usage = Gauge(f"{PREFIX}_token_usage", "Used / total KV tokens.", registry=r)
        self.free_pages = Gauge(f"{PREFIX}_num_free_pages", "KV pages free now.", registry=r)
        self.evictable_pages = Gauge(
            f"{PREFIX}_num_evictable_pages", "Cached pages nobody holds.", registry=r
        )
        self.cache_hit_rate = Gauge(
            f"{PREFIX}_cache_hit_rate", "Cached / prompt tokens since start.", registry=r
        )
        self.prefill_throughput = Gauge(
            f"{PREFIX}_prefill_throughput", "Prefill tokens per second over the last window.", registry=r
        )
        self.decode_throughput = Gauge(
            f"{PREFIX}_gen_throughput", "Decode tokens per second over the last window.", registry=r
        )
        self.counters = {
            key: Counter(f"{PREFIX}_{name}", text, registry=r) for key, (name, text) in _COUNTERS.items()
        }
        self.sglang = SglangWorkerSeries(r, model_name=model, role=role)
        self._baseline: EngineSnapshot | None = None
        self._last: EngineSnapshot | None = None
        self._window_start: tuple[float, EngineSnapshot] | None = None

    def publish(self, snap: EngineSnapshot, now: float | None = None) -> None:
        """Sets gauges and advances counters; the first call only records the baseline."""
        now = time.monotonic() if now is None else now
        self.num_waiting.set(snap.load.num_waiting)
        self.num_running.set(snap.load.num_running)
        self.used_tokens.set(snap.load.num_used_tokens)
        self.total_tokens.set(snap.load.max_total_num_tokens)
        self.token_usage.set(
            snap.load.num_used_tokens / snap.load.max_total_num_tokens
            if snap.load.max_total_num_tokens
            else 0.0
        )
        self.free_pages.set(snap.load.num_free_pages)
        self.evictable_pages.set(snap.load.num_evictable_pages)
        if self._last is None:
            self._baseline, self._last, self._window_start = snap, snap, (now, snap)
            self.sglang.set_load(snap.load, None, 0.0)
            return
        increases = {
            f.name: getattr(snap.stats, f.name) - getattr(self._last.stats, f.name)
            for f in dataclasses.fields(snap.stats)
        }
        for key, counter in self.counters.items():
            if increases[key] > 0:
                counter.inc(increases[key])
        self.sglang.count(increases)
        self._last = snap
        prompt = snap.stats.prompt_tokens - self._baseline.stats.prompt_tokens
        cached = snap.stats.cached_tokens - self._baseline.stats.cached_tokens
        hit_rate = cached / prompt if prompt else 0.0
        self.cache_hit_rate.set(hit_rate)
        start_t, start = self._window_start
        gen_throughput = None
        if now - start_t >= self.window_s:
            span = now - start_t
            self.prefill_throughput.set(
                (snap.stats.prefill_tokens_computed - start.stats.prefill_tokens_computed) / span
            )
            gen_throughput = (snap.stats.decode_tokens_computed - start.stats.decode_tokens_computed) / span
            self.decode_throughput.set(gen_throughput)
            self._window_start = (now, snap)
        self.sglang.set_load(snap.load, gen_throughput, hit_rate)
        self.sglang.set_latency(snap.latency.minus(self._baseline.latency))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; safe from any thread."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
