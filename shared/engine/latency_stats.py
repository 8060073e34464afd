"""Request latencies measured inside one engine, in SGLang's histogram buckets.

    latency = RequestLatencies()
    latency.on_output(req, num_tokens=1, now=time.monotonic())   # each output the engine emits
    latency.on_finish(req, now)                                   # once, when a sample finishes
    snapshot = latency.copy()                                     # plain numbers for another thread

What is measured, per sample, from the moment the engine accepted it (`Req.arrival_time`):
- time to first token: to its first output that carries tokens;
- inter-token latency: between its outputs that carry tokens, counted once per token (an output
  of k tokens after a gap g counts k tokens of g / k each, as SGLang counts them);
- end-to-end latency: to its finish, for samples that were not aborted.

On a decode worker of a P/D pair "accepted" is when the DecodeRequest arrived, so its time to first
token includes the prefill worker's work and the KV transfer. The router measures the client's view
of the same three (router/serving/metrics.py); these are the worker's own.

Rules: the engine's thread observes, nobody else; `copy()` is how another thread gets the numbers.
An observation is a bisect and two additions (it runs for every output, on the engine's hot loop).
The bucket bounds are SGLang's defaults (sglang/srt/metrics/collector.py), so a histogram of a
pdserve worker or router sums with an SGLang server's.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from pdserve.shared.engine.request import Req

# SGLang's default bucket upper bounds (seconds)
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
    0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)  # fmt: skip
E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
)  # fmt: skip


@dataclass
class LatencyHistogram:
    """Counts per bucket (`counts[i]`: values <= bounds[i] and > bounds[i-1]; the last one: above
    every bound), their sum, and how many."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float, times: int = 1) -> None:
        """Counts `value` `times` times."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def cumulative(self) -> list[int]:
        """Prometheus' view: how many values are <= each bound, then the total (+Inf)."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.bounds, list(self.counts), self.sum)

    def minus(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """What was observed since `earlier` (a copy of this histogram taken before)."""
        counts = [now - then for now, then in zip(self.counts, earlier.counts)]
        return LatencyHistogram(self.bounds, counts, self.sum - earlier.sum)


@dataclass
class RequestLatencies:
    ttft: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(TTFT_BUCKETS))
    itl: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(ITL_BUCKETS))
    e2e: LatencyHistogram = field(default_factory=lambda: LatencyHistogram(E2E_BUCKETS))

    def on_output(self, req: Req, num_tokens: int, now: float) -> None:
        """An output of req carrying num_tokens (> 0) tokens left the engine at `now` (monotonic)."""
        if req.last_output_at == 0.0:
            self.ttft.observe(now - req.arrival_time)
        elif num_tokens == 1:
            self.itl.observe(now - req.last_output_at)
        else:
            self.itl.observe((now - req.last_output_at) / num_tokens, num_tokens)
        req.last_output_at = now

    def on_finish(self, req: Req, now: float) -> None:
        reason = req.finish_reason or {}
        if reason.get("type") != "abort":
            self.e2e.observe(now - req.arrival_time)

    def copy(self) -> RequestLatencies:
        return RequestLatencies(self.ttft.copy(), self.itl.copy(), self.e2e.copy())

    def minus(self, earlier: RequestLatencies) -> RequestLatencies:
        return RequestLatencies(
            self.ttft.minus(earlier.ttft), self.itl.minus(earlier.itl), self.e2e.minus(earlier.e2e)
        )
