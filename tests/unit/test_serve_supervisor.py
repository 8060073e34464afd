"""`serve`'s restart policy and supervisor in memory: exit events and a clock in, delays or give-up out.

Checked:
1. delays double from 1 s and stop at 30 s; a child that stayed ready a minute starts over at 1 s;
2. give up after N exits before ready in a row (a ready run in between resets the count), or after
   more than K restarts in the window (old restarts leave the window);
3. the supervisor restarts an exited child after the delay, logs the child, its status or signal
   and the delay, waits for the child it starts `after`, and raises ChildGaveUp naming the child;
4. the readiness check matches the router's live workers by ZMQ address.
"""

from __future__ import annotations

import logging
import signal

import pytest

from pdserve.shared.launch.serve.readiness import missing_workers
from pdserve.shared.launch.serve.restart_policy import GiveUp, RestartPolicy, RestartRules
from pdserve.shared.launch.serve.supervisor import ChildGaveUp, Supervisor, describe_exit


def _crash_loop(policy: RestartPolicy, t: float, runs: int, up_s: float = 5.0) -> tuple[list, float]:
    """The child becomes ready after each restart and exits up_s later: the decisions, and the time."""
    decisions = []
    for _ in range(runs):
        t += up_s
        decision = policy.exited(t)
        decisions.append(decision)
        if isinstance(decision, GiveUp):
            break
        t += decision
        policy.started(t)
        policy.ready(t + 1)
    return decisions, t


def test_delays_double_up_to_the_cap_and_reset_after_a_stable_run():
    rules = RestartRules(max_restarts=100, window_s=10.0)
    policy = RestartPolicy(rules, now=0.0)
    decisions, t = _crash_loop(policy, 0.0, 8)
    assert decisions == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    policy.started(t)
    policy.ready(t + 1)
    assert policy.exited(t + 1 + rules.stable_after_s) == 1.0  # a minute up: no longer a crash loop
    assert policy.exited(t + 200) == 2.0  # exited before ready again: the back-off grows once more


def test_gives_up_after_n_exits_before_ready_in_a_row():
    policy = RestartPolicy(RestartRules(max_failed_starts=3), now=0.0)
    assert policy.exited(100.0) == 1.0  # it was ready: a first crash
    t = 101.0
    for expected in (2.0, 4.0):
        policy.started(t)
        assert policy.exited(t + 0.5) == expected  # died while starting
        t += 0.5 + expected
    policy.started(t)
    decision = policy.exited(t + 0.5)
    assert decision == GiveUp("exited before becoming ready 3 times in a row")


def test_a_ready_run_resets_the_failed_start_count():
    policy = RestartPolicy(RestartRules(max_failed_starts=2), now=0.0)
    t = 10.0
    for _ in range(4):  # fails to start once, then comes up: never two failures in a row
        assert not isinstance(policy.exited(t), GiveUp)
        policy.started(t + 1)
        assert not isinstance(policy.exited(t + 2), GiveUp)
        policy.started(t + 40)
        policy.ready(t + 41)
        t += 50


def test_gives_up_after_k_restarts_in_the_window_and_forgets_old_ones():
    rules = RestartRules(max_restarts=3, window_s=100.0, max_delay_s=1.0)
    decisions, _ = _crash_loop(RestartPolicy(rules, 0.0), 0.0, 10, up_s=5.0)
    assert decisions[:3] == [1.0, 1.0, 1.0]
    assert decisions[3] == GiveUp("exited 4 times within 100 s")
    spread, _ = _crash_loop(RestartPolicy(rules, 0.0), 0.0, 10, up_s=40.0)  # 3 per 100 s at most
    assert not any(isinstance(d, GiveUp) for d in spread)


def test_rules_are_validated():
    with pytest.raises(ValueError):
        RestartPolicy(RestartRules(max_failed_starts=0), now=0.0)
    with pytest.raises(ValueError):
        RestartRules(first_delay_s=60.0, max_delay_s=30.0).validate()


class FakeChild:
    """A child process in memory: the test sets its exit status and readiness."""

    def __init__(self, name: str, fail_restarts: int = 0):
        self.name = name
        self.pid = 100
        self.status: int | None = None
        self.ready = True
        self.restarts = 0
        self.fail_restarts = fail_restarts

    def poll(self) -> int | None:
        return self.status

    def is_ready(self) -> bool:
        return self.ready

    def restart(self) -> None:
        self.restarts += 1
        if self.restarts <= self.fail_restarts:
            raise OSError("no such binary")
        self.pid += 1
        self.status, self.ready = None, False

    def tail(self) -> str:
        return "last words"

    def kill(self) -> None:
        self.status = -signal.SIGKILL


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_supervisor_restarts_after_the_delay_and_logs_it(caplog):
    clock = Clock()
    sup = Supervisor(RestartRules(), 60.0, clock)
    worker, router = FakeChild("mixed-1"), FakeChild("router")
    sup.add(worker)
    sup.add(router)
    worker.status = -signal.SIGKILL
    with caplog.at_level(logging.INFO, logger="pdserve.serve"):
        sup.step()
    assert "mixed-1 (pid 100) exited with signal SIGKILL; restarting it in 1 s" in caplog.text
    clock.t = 0.9
    sup.step()
    assert worker.restarts == 0 and router.restarts == 0
    clock.t = 1.0
    sup.step()
    assert worker.restarts == 1 and worker.pid == 101
    worker.ready = True
    with caplog.at_level(logging.INFO, logger="pdserve.serve"):
        sup.step()
    assert "mixed-1 is ready again (pid 101)" in caplog.text
    assert router.restarts == 0


def test_supervisor_waits_for_the_child_it_starts_after():
    clock = Clock()
    sup = Supervisor(RestartRules(), 60.0, clock)
    first, second = FakeChild("decode-0"), FakeChild("decode-1")
    sup.add(first)
    sup.add(second, after="decode-0")
    first.status = second.status = 1
    sup.step()
    clock.t = 1.0
    sup.step()
    assert first.restarts == 1 and second.restarts == 0  # decode-0 is not ready yet
    clock.t = 5.0
    sup.step()
    assert second.restarts == 0
    first.ready = True
    sup.step()
    sup.step()
    assert second.restarts == 1


def test_supervisor_gives_up_naming_the_child():
    clock = Clock()
    sup = Supervisor(RestartRules(max_failed_starts=2), 60.0, clock)
    router = FakeChild("router", fail_restarts=10)  # every restart raises: a failed start
    sup.add(router)
    router.status = 1
    sup.step()  # exit with status 1: restart in 1 s
    clock.t = 1.0
    sup.step()  # the restart fails: restart in 2 s
    clock.t = 3.0
    with pytest.raises(ChildGaveUp) as exc:
        sup.step()
    message = str(exc.value)
    assert message.startswith("router exited with a failed start and exited before becoming ready 2 times")
    assert message.endswith("its last output:\nlast words")


def test_a_restarted_child_not_ready_in_time_is_killed_and_counts_as_a_failed_start():
    clock = Clock()
    sup = Supervisor(RestartRules(max_failed_starts=1), 60.0, clock)
    worker = FakeChild("mixed-0")
    sup.add(worker)
    worker.status = 1
    sup.step()
    clock.t = 1.0
    sup.step()  # restarted, loading
    clock.t = 60.0
    sup.step()
    assert worker.status is None  # not past the deadline yet
    clock.t = 61.5
    sup.step()
    assert worker.status == -signal.SIGKILL
    with pytest.raises(
        ChildGaveUp, match="mixed-0 exited with signal SIGKILL and exited before becoming ready 1"
    ):
        sup.step()


def test_describe_exit():
    assert describe_exit(1) == "status 1"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(None) == "a failed start"


def test_missing_workers_matches_live_workers_by_address():
    info = {
        "live_workers": {"mixed": ["mixed@127.0.0.1:5"], "prefill": [], "decode": []},
        "workers": [
            {"worker_id": "mixed@127.0.0.1:5", "zmq_addr": "tcp://127.0.0.1:5"},
            {"worker_id": "mixed@127.0.0.1:6", "zmq_addr": "tcp://127.0.0.1:6"},  # known, not live
        ],
    }
    addrs = {"mixed-0": "tcp://127.0.0.1:5", "mixed-1": "tcp://127.0.0.1:6", "mixed-2": "tcp://127.0.0.1:7"}
    assert missing_workers(info, addrs) == ["mixed-1", "mixed-2"]
    assert missing_workers({}, {"mixed-0": "tcp://127.0.0.1:5"}) == ["mixed-0"]
