"""What the scheduler hands the model runner for one step (a ScheduledBatch) and what it reports
back to the engine (a StepResult). Plain data, no torch: the runner, the batch pipeline and the
batch log read it without the scheduler's policy."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdserve.shared.engine.request import Req


class BatchKind(enum.IntEnum):
    EXTEND = 1
    DECODE = 2


@dataclass
class ScheduledBatch:
    kind: BatchKind
    reqs: list[Req]
    prefix_lens: list[int]  # num_computed of each request before this step
    extend_lens: list[int]  # tokens computed for each request this step
    cached_tokens: int = 0  # prompt tokens the requests admitted by this batch found in the cache

    def samples(self, i: int) -> bool:
        """Whether request i reaches the end of its fill_ids this step (and so samples a token)."""
        req = self.reqs[i]
        reaches_end = self.prefix_lens[i] + self.extend_lens[i] == req.seq_len_with_in_flight
        return reaches_end and req.params.max_new_tokens > 0


@dataclass
class StepResult:
    """What changed for the engine to report: requests that gained tokens or finished."""

    progressed: list[Req] = field(default_factory=list)
    finished: list[Req] = field(default_factory=list)
