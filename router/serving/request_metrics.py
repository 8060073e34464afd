"""`router --log-requests`: each request's numbers in one log line when it ends, as SGLang's
`--log-requests` logs a `Finish:` line per request.

    state.generator = RequestLog(state.generator)       # router/cli.py, with --log-requests

    INFO pdserve.router.requests: Finish: rid=9f2c..., prompt_tokens=6, completion_tokens=8,
        cached_tokens=0, e2e_latency=0.153, finish_reason={'type': 'length', 'length': 8}

Rules:
- RequestLog wraps the router's TextGenerator (router/serving/generator_api.py) and changes nothing of what
  goes through it; every route that generates (native, OpenAI, /health_generate) is logged;
- one line per request, when its stream closes: `prompt_tokens` and `cached_tokens` of the prompt,
  `completion_tokens` summed over its samples (`n` > 1 adds `n=` and one finish_reason per sample),
  `e2e_latency` in seconds from the router's first look at it (its wait for a running slot included,
  as the router's latency histograms count it);
- a stream that closes before every sample finished says why as its finish_reason: the client
  went away (`abort`, "client disconnected") or the error that ended it;
- only the events the stream yields are read: a sample's last event always is (router/serving/inbox.py
  delivers only a stream's ordinary tokens inline), so the counts are the final ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pdserve.router.serving.generator_api import GenerateInput, GenerationError, SampleEvent

logger = logging.getLogger("pdserve.router.requests")


class RequestLog:
    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # check(), abort(), ...: the wrapped generator's

    async def stream(self, inp: GenerateInput, *args: Any, **kwargs: Any) -> AsyncIterator[SampleEvent]:
        start = time.perf_counter()
        last: dict[int, SampleEvent] = {}  # sample index -> its latest yielded event
        ended_by: dict[str, Any] | None = None
        try:
            async for event in self._inner.stream(inp, *args, **kwargs):
                last[event.index] = event
                yield event
        except asyncio.CancelledError:
            ended_by = {"type": "abort", "message": "client disconnected"}
            raise
        except GenerationError as exc:
            ended_by = {"type": "abort", "status_code": exc.status, "message": exc.message}
            raise
        except GeneratorExit:  # the consumer stopped reading (it closed the stream)
            ended_by = {"type": "abort", "message": "the stream was closed before its end"}
            raise
        finally:
            if logger.isEnabledFor(logging.INFO):
                logger.info(finish_line(inp, last, time.perf_counter() - start, ended_by))


def finish_line(
    inp: GenerateInput,
    last: dict[int, SampleEvent],
    e2e_latency: float,
    ended_by: dict[str, Any] | None = None,
) -> str:
    """The `Finish:` line of a request whose samples' last events are `last`; `ended_by`: why its
    stream closed early (None when it ran to its end)."""
    n = int((inp.sampling_params or {}).get("n", 1) or 1)
    events = [last[i] for i in sorted(last)]
    first = events[0] if events else None
    reasons = [
        e.finish_reason if e.finished else (ended_by or {"type": "abort", "message": "unfinished"})
        for e in events
    ]
    if not events:
        reasons = [ended_by or {"type": "abort", "message": "no output"}]
    fields = [
        f"rid={inp.rid}",
        *([f"n={n}"] if n > 1 else []),
        f"prompt_tokens={first.prompt_tokens if first else _length(inp.input_ids)}",
        f"completion_tokens={sum(e.completion_tokens for e in events)}",
        f"cached_tokens={first.cached_tokens if first else 0}",
        f"e2e_latency={e2e_latency:.3f}",
        f"finish_reason={reasons[0] if n == 1 else reasons}",
    ]
    return "Finish: " + ", ".join(fields)


def _length(ids: Any) -> int:
    return len(ids) if isinstance(ids, list) else 0  # a refused request may carry anything
