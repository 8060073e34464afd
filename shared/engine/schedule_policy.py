"""Orders the waiting queue before admission: fcfs (arrival) or lpm (longest cached prefix first).

LPM costs one radix walk per waiting request per step, so beyond `LPM_MAX_QUEUE` waiting requests it
falls back to fcfs (a long queue is where the walk hurts and where order matters least).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.shared.engine.request import Req

LPM_MAX_QUEUE = 128


def order_waiting(policy: str, waiting: Sequence[Req], cached_len: Callable[[Req], int]) -> list[Req]:
    """Returns the waiting requests in the order admission should try them.

    Retracted requests (already admitted once) keep their place at the front whatever the policy:
    they were running and should resume before newcomers.
    """
    resumed = [r for r in waiting if r.num_retractions > 0]
    fresh = [r for r in waiting if r.num_retractions == 0]
    if policy == "lpm" and len(fresh) <= LPM_MAX_QUEUE:
        # stable sort: equal prefixes keep arrival order
        fresh = sorted(fresh, key=lambda r: -cached_len(r))
    return resumed + fresh
