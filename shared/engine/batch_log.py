"""SGLang's batch log lines, from the engine's loop: one per prefill batch, one every
`decode_log_interval` decode steps (SGLang's `--decode-log-interval`, default 40). The text is
SGLang 0.5.3's, trailing separator included, so that its log parsers read pdserve's lines:

    Prefill batch. #new-seq: 1, #new-token: 6, #cached-token: 0, token usage: 0.00, #running-req: 0, #queue-req: 0,
    Decode batch. #running-req: 1, #token: 54, token usage: 0.00, cuda graph: False, gen throughput (token/s): 6.02, #queue-req: 0,

    log = BatchLog(decode_log_interval=40, graph_label="cuda graph")
    log.role_fields = lambda kind: "..."                     # a P/D role's own fields (below)
    log.prefill(batch, scheduler)                            # as an extend batch starts
    log.decode(batch, scheduler, runner.decode_uses_graph)   # as each decode step starts

Fields, as SGLang's scheduler prints them:
- #new-seq: requests in the prefill batch (newly admitted, and the next chunk of those already
  prefilling); #new-token: tokens the batch computes; #cached-token: prompt tokens the newly
  admitted ones found in the prefix cache;
- #token: KV tokens held by requests (neither free nor evictable cache); token usage: the same
  over the whole pool;
- #running-req: requests decoding (a prefill line: before the batch; a decode line: in the step);
  #queue-req: requests waiting to be admitted;
- cuda graph (`cpu graph` off CUDA): whether the decode step replays a captured graph;
- gen throughput: tokens decoded per second over the steps since the previous decode line;
- the roles' own, from `role_fields(kind)`, where SGLang puts them: a prefill worker's prefill line
  ends with `#prealloc-req` (requests whose decode side has not named its pages yet) and
  `#inflight-req` (prompts computed, KV still moving); a decode worker's decode line has
  `pre-allocated usage`, `#prealloc-req` (waiting for pages), `#transfer-req` (waiting for KV) and
  `#retracted-req` before the graph field.

Rules: lines go to this module's logger at INFO. The loop pays for a line only where one is
printed: a decode step without a line costs a counter and an addition, and nothing is read from the
pool or formatted unless the logger prints INFO. `decode_log_interval` 0 prints no decode line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pdserve.shared.engine.scheduled_batch import ScheduledBatch
from pdserve.shared.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

DEFAULT_DECODE_LOG_INTERVAL = 40  # SGLang's default


def token_usage(scheduler: Scheduler) -> tuple[int, float]:
    """(KV tokens held by requests, their share of the pool), as SGLang counts them: what is
    neither free nor evictable cache."""
    kv = scheduler.kv
    used_pages = kv.num_total_pages - kv.num_free_pages - kv.num_evictable_pages
    return (
        used_pages * scheduler.config.page_size,
        used_pages / kv.num_total_pages if kv.num_total_pages else 0.0,
    )


class BatchLog:
    def __init__(
        self, decode_log_interval: int = DEFAULT_DECODE_LOG_INTERVAL, graph_label: str = "cuda graph"
    ):
        self.decode_log_interval = decode_log_interval
        self.graph_label = graph_label
        # "prefill" | "decode" -> the role's own fields, each followed by ", " (none for mixed)
        self.role_fields: Callable[[str], str] | None = None
        self._steps = 0  # decode steps since the last decode line
        self._tokens = 0  # tokens of the steps counted since then (the current one not yet)
        self._since: float | None = None  # when the first of them started

    def prefill(self, batch: ScheduledBatch, scheduler: Scheduler) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        _, usage = token_usage(scheduler)
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d, %s",
            len(batch.reqs),
            sum(batch.extend_lens),
            batch.cached_tokens,
            usage,
            len(scheduler.running),
            scheduler.num_waiting,
            self.role_fields("prefill") if self.role_fields else "",
        )

    def decode(self, batch: ScheduledBatch, scheduler: Scheduler, uses_graph: Callable[[int], bool]) -> None:
        """Counts a decode step of `batch`; prints a line at every `decode_log_interval`-th one.
        `uses_graph(batch_size)`: whether the step runs a CUDA graph (asked only for a line)."""
        self._steps += 1
        if self.decode_log_interval > 0 and self._steps >= self.decode_log_interval:
            now = time.perf_counter()
            if logger.isEnabledFor(logging.INFO):
                self._print(batch, scheduler, uses_graph, now)
            self._steps, self._tokens, self._since = 0, 0, now
        elif self._since is None:
            self._since = time.perf_counter()
        self._tokens += len(batch.reqs)

    def _print(
        self, batch: ScheduledBatch, scheduler: Scheduler, uses_graph: Callable[[int], bool], now: float
    ) -> None:
        elapsed = now - self._since if self._since is not None else 0.0
        throughput = self._tokens / elapsed if elapsed > 0 else 0.0
        used, usage = token_usage(scheduler)
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, %s%s: %s, "
            "gen throughput (token/s): %.2f, #queue-req: %d, ",
            len(batch.reqs),
            used,
            usage,
            self.role_fields("decode") if self.role_fields else "",
            self.graph_label,
            uses_graph(len(batch.reqs)),
            throughput,
            scheduler.num_waiting,
        )
