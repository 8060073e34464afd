"""Start-up steps that take long say so: a line when one has run a second, another when it ends.

    with slow_step("loading weights"):
        model = load_model(...)

    # after 1 s:   INFO pdserve.startup: loading weights ...
    # at the end:  INFO pdserve.startup: loading weights: done in 3.4 s

Rules:
- a step that ends within `announce_after_s` (1 s) logs nothing, so a fast start-up stays quiet;
  a longer one is announced while it runs (a timer thread logs it: the step itself may be one
  call that never returns to Python, a torch import or a CUDA graph capture), then its end;
- an exception ends an announced step with "<what>: failed after X s" and propagates;
- the lines go to the `pdserve.startup` logger at INFO, so every process (worker, router) shows
  its start-up steps under one name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("pdserve.startup")

ANNOUNCE_AFTER_S = 1.0


@contextmanager
def slow_step(what: str, announce_after_s: float = ANNOUNCE_AFTER_S) -> Iterator[None]:
    lock = threading.Lock()
    state = {"announced": False, "over": False}

    def announce() -> None:
        with lock:  # not once the step is over: its end line would come before its start line
            if not state["over"]:
                state["announced"] = True
                logger.info("%s ...", what)

    timer = threading.Timer(announce_after_s, announce)
    timer.daemon = True
    start = time.monotonic()
    timer.start()
    outcome = "done in"
    try:
        yield
    except BaseException:
        outcome = "failed after"
        raise
    finally:
        timer.cancel()
        with lock:
            state["over"] = True
            if state["announced"]:
                logger.info("%s: %s %.1f s", what, outcome, time.monotonic() - start)
