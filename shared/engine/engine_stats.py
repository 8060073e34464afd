"""The engine's monotonic counters for /metrics. A module of their own, so the batch pipeline and
the worker's metrics name them without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Monotonic counters for /metrics; throughputs are derived by the scraper."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_tokens_computed: int = 0
    decode_tokens_computed: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    num_retractions: int = 0
    jump_forward_tokens: int = 0  # output tokens a grammar forced, computed without decode steps
    num_steps: int = 0
