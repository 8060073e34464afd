"""`router --processes N`: the pure rules (router/processes.py) and the metrics summed over processes
(router/serving/metrics.py, with prometheus_client's files written by real separate processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.cli import args_from, build_parser
from pdserve.router.processes import (
    METRICS_DIR_ENV,
    ROLE_ENV,
    ProcessRole,
    RestartBackoff,
    capacity_share,
    child_argv,
)
from pdserve.router.serving.metrics import _SummedOverProcesses


def test_a_router_without_the_environment_is_the_only_one():
    role = ProcessRole.from_env({})
    assert (role.index, role.count, role.is_child, role.metrics_dir) == (0, 1, False, None)


def test_child_env_round_trips_and_names_siblings_sockets():
    role = ProcessRole(1, 3, "/tmp/run")
    env = role.child_env({"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env[METRICS_DIR_ENV] == "/tmp/run/metrics"
    back = ProcessRole.from_env(env)
    assert back == role and back.is_child
    assert back.sibling_sockets() == ["/tmp/run/control-0.sock", "/tmp/run/control-2.sock"]
    assert back.control_socket(1) == "/tmp/run/control-1.sock"


def test_an_index_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        ProcessRole.from_env({ROLE_ENV: "2/2/tmp/x"})


def test_child_argv_binds_the_parents_port_last():
    argv = ["--port", "0", "--processes", "2", "--worker-addr", "tcp://h:1"]
    out = child_argv(argv, 41000)
    assert out[:-2] == argv and out[-2:] == ["--port", "41000"]
    ns = build_parser().parse_args(out)
    assert ns.port == 41000 and ns.processes == 2  # argparse keeps the last --port


@pytest.mark.parametrize(
    ("total", "count", "share"),
    [(None, 2, None), (8, 1, 8), (8, 2, 4), (9, 2, 4), (3, 4, 1), (1, 3, 1), (48, 3, 16)],
)
def test_capacity_share(total, count, share):
    assert capacity_share(total, count) == share
    if total is not None and total >= count:
        assert capacity_share(total, count) * count <= total  # together never more than the workers


def test_restart_back_off_doubles_to_its_cap_and_resets_after_a_stable_run():
    policy = RestartBackoff(first_delay_s=0.5, max_delay_s=4.0, stable_after_s=30.0)
    delays, delay = [], 0.0
    for _ in range(6):
        delay = policy.next_delay(delay, ran_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.next_delay(4.0, ran_s=31.0) == 0.5


@pytest.mark.parametrize(("value", "ok"), [("1", True), ("4", True), ("0", False), ("-1", False)])
def test_processes_flag_is_validated(value, ok):
    ns = build_parser().parse_args(["--processes", value])
    if ok:
        assert args_from(ns).processes == int(value)
    else:
        with pytest.raises(ValueError, match="--processes must be >= 1"):
            args_from(ns)


def test_the_default_is_one_process():
    assert args_from(build_parser().parse_args([])).processes == 1


_CHILD = textwrap.dedent(
    """
    import sys
    from pdserve.router.serving.metrics import RouterMetrics
    m = RouterMetrics()
    assert m.multiprocess_dir is not None
    prompt, cached, n = (int(x) for x in sys.argv[1:])
    for _ in range(n):
        m.observe_http("/generate", 200)
        m.observe_request_done(0.02, prompt, 5, cached)
        m.running.inc()
    m.set_workers([("w1", 3, n, True, 2)])
    """
)


def _families(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_of_separate_processes_are_summed(tmp_path):
    env = {**os.environ, METRICS_DIR_ENV: str(tmp_path)}
    for args in (("100", "50", "3"), ("100", "0", "2")):  # two processes: 3 and 2 requests
        subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    registry.register(_SummedOverProcesses(str(tmp_path)))
    got = _families(generate_latest(registry).decode())
    p = "pdserve_router_"
    assert got[p + "requests_total"][(("code", "200"), ("route", "/generate"))] == 5
    assert got[p + "prompt_tokens_total"][()] == 500
    assert got[p + "generation_tokens_total"][()] == 25
    assert got[p + "e2e_request_latency_seconds_count"][()] == 5
    assert got[p + "cache_hit_rate"][()] == pytest.approx(150 / 500)  # from the sums, not a mean of ratios
    assert list(got[p + "worker_load"].values()) == [3]  # the highest any process saw
    # "live" gauges count processes that still run: these two exited without being marked dead,
    # so they still count here (the supervisor marks a child dead when it exits).
    assert list(got[p + "worker_inflight"].values()) == [5]
    assert got[p + "generation_requests_running"][()] == 5
