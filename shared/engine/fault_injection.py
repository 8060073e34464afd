"""A test-only fault: one step that takes long on purpose. Off unless the environment sets it.

    PDSERVE_TEST_SLOW_STEP="20:slow-"   # sleep 20 s in the first step that holds a request whose
                                        # rid starts with "slow-" (once per such request)

A long prefill chunk on a CPU, a weights update or a CUDA-graph capture holds a worker's loop the
same way; tests use this to show that a busy worker is not taken for a dead one. The sleep happens
inside the step, before its forward pass, with the loop thread blocked as a real step blocks it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pdserve.shared.engine.request import Req

logger = logging.getLogger(__name__)

ENV_VAR = "PDSERVE_TEST_SLOW_STEP"


@dataclass
class SlowStep:
    seconds: float
    rid_prefix: str
    _slept_for: set[str] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> SlowStep | None:
        value = os.environ.get(ENV_VAR)
        if not value:
            return None
        seconds, _, prefix = value.partition(":")
        return cls(float(seconds), prefix)

    def before_forward(self, reqs: Iterable[Req]) -> None:
        due = {r.rid for r in reqs if r.rid.startswith(self.rid_prefix) and r.rid not in self._slept_for}
        if due:
            self._slept_for |= due
            logger.warning("%s: sleeping %g s inside this step (rids %s)", ENV_VAR, self.seconds, sorted(due))
            time.sleep(self.seconds)
