"""Prometheus metrics of one worker, in a registry of its own (never prometheus_client's global one).

Threading rule: only the loop thread reads the engine. It takes an `EngineSnapshot` (plain numbers)
and hands it to `WorkerMetrics.publish`; the HTTP thread only renders the registry, whose metric
objects guard their values with their own locks. So the HTTP thread never touches the engine.

Counters mirror the engine's monotonic `EngineStats` by adding the difference since the previous
snapshot; the first snapshot (taken after the warm-up) is the baseline, so warm-up traffic is not
counted. Throughput gauges are wall-clock rates over the last window of at least `window_s`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.shared.engine.engine import EngineStats
from pdserve.shared.protocol import LoadReport

PREFIX = "pdserve_worker"


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything /metrics shows, read from the engine in the loop thread: its load report and a
    copy of its monotonic counters (EngineStats)."""

    load: LoadReport
    stats: EngineStats

    @classmethod
    def of(cls, engine) -> EngineSnapshot:
        """Reads the engine; call only from the thread that drives it."""
        return cls(load=engine.load(), stats=dataclasses.replace(engine.stats))


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
            return
        for key, counter in self.counters.items():
            delta = getattr(snap.stats, key) - getattr(self._last.stats, key)
            if delta > 0:
                counter.inc(delta)
        self._last = snap
        prompt = snap.stats.prompt_tokens - self._baseline.stats.prompt_tokens
        cached = snap.stats.cached_tokens - self._baseline.stats.cached_tokens
        self.cache_hit_rate.set(cached / prompt if prompt else 0.0)
        start_t, start = self._window_start
        if now - start_t >= self.window_s:
            span = now - start_t
            self.prefill_throughput.set(
                (snap.stats.prefill_tokens_computed - start.stats.prefill_tokens_computed) / span
            )
            self.decode_throughput.set(
                (snap.stats.decode_tokens_computed - start.stats.decode_tokens_computed) / span
            )
            self._window_start = (now, snap)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; safe from any thread."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
