"""Start-up steps announce themselves only when they run long (shared/engine/startup_log.py)."""

from __future__ import annotations

import logging
import time

import pytest

from pdserve.shared.engine.startup_log import slow_step


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pdserve.startup"]


def test_a_quick_step_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="pdserve.startup"), slow_step("reading a file", 0.5):
        pass
    time.sleep(0.6)  # the timer would have fired by now
    assert messages(caplog) == []


def test_a_long_step_is_announced_while_it_runs_then_ends(caplog):
    with caplog.at_level(logging.INFO, logger="pdserve.startup"), slow_step("loading weights", 0.05):
        deadline = time.monotonic() + 5
        while not messages(caplog) and time.monotonic() < deadline:
            time.sleep(0.01)  # the step runs on: its line comes from the timer thread meanwhile
        assert messages(caplog) == ["loading weights ..."]
    end = messages(caplog)[1]
    assert len(messages(caplog)) == 2 and end.startswith("loading weights: done in ") and end.endswith(" s")


def test_a_failing_long_step_says_it_failed_and_raises(caplog):
    with (
        caplog.at_level(logging.INFO, logger="pdserve.startup"),
        pytest.raises(ValueError),
        slow_step("capturing CUDA graphs", 0.01),
    ):
        time.sleep(0.2)
        raise ValueError("out of memory")
    assert messages(caplog)[0] == "capturing CUDA graphs ..."
    assert messages(caplog)[1].startswith("capturing CUDA graphs: failed after ")
