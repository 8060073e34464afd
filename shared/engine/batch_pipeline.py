"""Runs the scheduler's batches on the model runner: one at a time, or with decode steps overlapped.

In order (`--disable-overlap-schedule`; the default on the CPU, where nothing runs asynchronously):
schedule, run, read the tokens, update the scheduler, report. On a GPU the device idles while the
host plans the step, packs its inputs, reads the tokens and builds and sends the outputs.

Overlapped (the default on CUDA), after SGLang's overlap scheduler: a decode step is launched and
left running; the host then reads the previous step's tokens, runs their stop checks and returns
their requests (the engine builds the outputs, the worker sends them), and in the next call plans and
packs the next step, whose input ids for continuing requests come from the running step's sampled
ids on the device (in_flight.py). The device runs step N while the host finishes N-1 and prepares N+1:

    host:    plan N, launch N │ read N-1, report N-1, send │ plan N+1, launch N+1 │ read N, ...
    device:  ... N-1 ........ │ N ............................................. │ N+1 ...

A request finished by its in-flight token (a stop token) was planned into one step too many: that
step's token for it is dropped when read, its KV slot having gone back with its pages (the device
writes it before any later step can reuse the page: one stream, in launch order). A request whose
in-flight token is its last whatever the value (max_new_tokens) is left out of the next step.

A step with constrained rows (grammar.py) overlaps too, as in SGLang: its sampling needs a bitmask
that needs each row's previous token, its forward does not. So its forward is launched at once on
the futures (CUDA graph replay included); then the host reads the step before (its tokens are
ready while this forward runs), advances the matchers over them (and runs their stop checks), fills
the bitmask and launches this step's sampling with it:

    host:    plan N+1, forward N+1 │ read N, advance matchers, fill mask │ sample N+1, report N
    device:  ... N ................ │ forward N+1 ....................... │ sampling N+1 ...

A request that ends on step N's token (its grammar terminated, a stop token) was planned into step
N+1 once too often, as above: its row keeps an all-ones mask and its token is dropped when read.

Not overlapped: each of these first reads the step in flight, then runs as in order:
- extend (prefill) batches, which also sync when their inputs are built;
- a decode step that would retract or stop a request for want of pages (so the choice sees which
  requests the in-flight tokens finish, as without overlap);
- a decode step with a request that asks for logprobs (its logits are overwritten by the next
  launch) or samples with penalties (the next step would need this step's token ids on the host):
  it is read right after it is launched;
- with jump-forward on (`--enable-jump-forward`), a decode step with a constrained request, read
  right after it is launched too: a jump appends tokens and moves the request back to prefilling,
  which must happen before the next step is planned.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pdserve.shared.engine.batch_log import BatchLog
from pdserve.shared.engine.fault_injection import SlowStep
from pdserve.shared.engine.in_flight import LaunchedDecode
from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampler import reads_output_ids
from pdserve.shared.engine.scheduled_batch import BatchKind, ScheduledBatch
from pdserve.shared.engine.scheduler import Scheduler

if TYPE_CHECKING:
    from pdserve.shared.engine.engine_stats import EngineStats


class BatchPipeline:
    """Owns the decode step in flight (at most one); `overlap` False runs every batch in order.
    `batch_log` hears every batch as it starts (SGLang's batch lines, batch_log.py)."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        stats: EngineStats,
        overlap: bool,
        batch_log: BatchLog | None = None,
    ):
        self.slow_step = SlowStep.from_env()  # a test-only fault, off unless the environment sets it
        self.scheduler = scheduler
        self.runner = runner
        self.stats = stats
        self.overlap = overlap
        self.batch_log = batch_log or BatchLog()
        self.in_flight: LaunchedDecode | None = None
        self.num_overlapped_steps = 0  # decode steps left running while the host went on

    def step(self) -> list[Req]:
        """Schedules and runs one batch; returns the requests that gained tokens or finished."""
        progressed: list[Req] = []
        if self.in_flight is not None and not self.scheduler.can_schedule_ahead():
            progressed += self.drain()
        batch = self.scheduler.schedule()
        # requests the scheduler stopped itself (a lone request that outgrew the pool) are in no batch
        stopped = self.scheduler.take_stopped()
        if batch is not None and self.slow_step is not None:
            self.slow_step.before_forward(batch.reqs)
        if batch is None:
            progressed += self.drain()
        elif batch.kind == BatchKind.EXTEND:
            progressed += self.drain()
            progressed += self._run_extend(batch)
        else:
            progressed += self._run_decode(batch)
        self.stats.num_retractions = self.scheduler.num_retractions
        self.stats.jump_forward_tokens = self.scheduler.num_jump_forward_tokens
        return list(dict.fromkeys(stopped + progressed))

    def drain(self) -> list[Req]:
        """Reads the decode step in flight, if any; returns the requests it progressed."""
        launched, self.in_flight = self.in_flight, None
        return self._collect(launched) if launched is not None else []

    def forget(self) -> None:
        """Drops the step in flight unread (every request in it was aborted)."""
        self.in_flight = None

    def _run_extend(self, batch: ScheduledBatch) -> list[Req]:
        self.batch_log.prefill(batch, self.scheduler)
        t0 = time.perf_counter()
        next_tokens = self.runner.run(batch)
        self.stats.prefill_tokens_computed += sum(batch.extend_lens)
        self.stats.prefill_seconds += time.perf_counter() - t0
        return self.scheduler.on_batch_done(batch, next_tokens).progressed

    def _run_decode(self, batch: ScheduledBatch) -> list[Req]:
        previous = self.in_flight
        futures = previous.future_ids() if previous is not None else None
        # a constrained row's bitmask needs its token in flight: read it between forward and sampling
        mask_waits = any(r.grammar is not None and r.tokens_in_flight for r in batch.reqs)
        self.batch_log.decode(batch, self.scheduler, self._uses_graph)
        t0 = time.perf_counter()
        forward = self.runner.launch_forward(batch, futures)
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_tokens_computed += len(batch.reqs)
        self.scheduler.on_decode_launched(batch)
        progressed: list[Req] = []
        if mask_waits and previous is not None:
            progressed, previous = self._collect(previous), None
        t0 = time.perf_counter()
        self.in_flight = self.runner.launch_sampling(forward)
        self.stats.decode_seconds += time.perf_counter() - t0
        if previous is not None:
            progressed = self._collect(previous)
        if self.overlap and self._may_stay_in_flight(self.in_flight):
            self.num_overlapped_steps += 1
        else:
            progressed += self.drain()
        return progressed

    def _may_stay_in_flight(self, launched: LaunchedDecode) -> bool:
        """Whether a launched step may stay unread while the next one is planned and launched."""
        jumps = self.scheduler.jumper is not None
        return not launched.wants_logprobs and not any(
            reads_output_ids(r.params) or (jumps and r.grammar is not None) for r in launched.batch.reqs
        )

    def _uses_graph(self, batch_size: int) -> bool:
        return self.runner.decode_uses_graph(batch_size)

    def _collect(self, launched: LaunchedDecode) -> list[Req]:
        t0 = time.perf_counter()
        tokens = self.runner.collect(launched)
        self.stats.decode_seconds += time.perf_counter() - t0  # launching plus waiting for the device
        return self.scheduler.on_decode_done(launched.batch, tokens).progressed
