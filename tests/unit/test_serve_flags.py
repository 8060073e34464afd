"""Every router and worker flag is either set by `serve` or accepted by it and passed on.

Checked, for the flags the router's and the worker's parsers have today (so a flag added there is
checked without touching this test):
1. each flag is set by serve (listed, with its reason), an engine flag, or passed on; the lists of
   flags set by serve name only flags that exist;
2. each flag passed on, given to `serve` with a value other than the child's default, reaches the
   child's command line, and the child's own parser reads back that value;
3. a flag left at its default is not passed (the child's command stays short and readable).
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.launch.serve import passthrough
from pdserve.shared.launch.serve.cli import build_parser
from pdserve.shared.launch.serve.plan import WorkerSpec, router_command, worker_command

REDIS = "redis://127.0.0.1:1/0"
ENGINE_DESTS = {f.name for f in dataclasses.fields(EngineArgs)}


@pytest.fixture(scope="module")
def parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, passthrough.PassThrough]:
    router, worker = passthrough.router_parser(), passthrough.worker_parser()
    return router, worker, passthrough.derive(router, worker)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {passthrough._long_option(a): a for a in parser._actions}


def test_every_flag_is_set_by_serve_or_passed_on(parsers):
    router, worker, flags = parsers
    assert flags.unsupported == []
    for side, parser, set_by_serve in (
        ("router", router, passthrough.ROUTER_SET_BY_SERVE),
        ("worker", worker, passthrough.WORKER_SET_BY_SERVE),
    ):
        dests = {a.dest for a in parser._actions}
        assert set(set_by_serve) <= dests, f"{side}: listed as set by serve but gone"
        for option, action in _options(parser).items():
            if action.dest in set_by_serve or (side == "worker" and action.dest in ENGINE_DESTS):
                continue
            passed = flags.flags.get(option)
            assert passed is not None and getattr(passed, f"to_{side}"), f"{side} {option} is not passed on"


def _other_value(action: argparse.Action) -> tuple[list[str], object]:
    """serve arguments that set the flag to a value other than its default, and that value."""
    option = passthrough._long_option(action)
    if action.nargs == 0:  # a switch
        return [option], action.const
    if action.choices:
        value = next(c for c in action.choices if c != action.default)
    elif action.type is int:
        value = (action.default or 0) + 7
    elif action.type is float:
        value = (action.default or 0.0) + 1.5
    else:
        value = "x-value"
    if isinstance(action, argparse._AppendAction):
        return [option, str(value)], [value]
    return [option, str(value)], value


@pytest.mark.parametrize("side", ["router", "worker"])
def test_each_flag_passed_on_reaches_the_child_with_its_value(parsers, side):
    router, worker, flags = parsers
    child_parser = router if side == "router" else worker
    actions = _options(child_parser)
    passed = [f for f in flags.flags.values() if getattr(f, f"to_{side}")]
    assert passed
    serve = build_parser(flags)
    spec = WorkerSpec("decode", "cpu", 0)
    for flag in passed:
        argv, value = _other_value(actions[flag.option])
        ns = serve.parse_args(argv)
        if side == "router":
            cmd = router_command(ns, REDIS, flags)
        else:
            cmd = worker_command(spec, ns, REDIS, flags)
        child_ns = child_parser.parse_args(cmd[3:])  # after `python -m module`
        assert getattr(child_ns, actions[flag.option].dest) == value, (flag.option, cmd)


def test_defaults_are_not_passed(parsers):
    flags = parsers[2]
    ns = build_parser(flags).parse_args([])
    assert router_command(ns, REDIS, flags)[3:] == [
        "--host", "127.0.0.1", "--port", "30000", "--redis-url", REDIS, "--log-level", "info",
        "--model-path", EngineArgs().model_path,
    ]  # fmt: skip
    mixed = worker_command(WorkerSpec("mixed", "cpu", 0), ns, REDIS, flags)
    assert "--kv-transfer-backend" not in mixed and "--num-reserved-decode-tokens" not in mixed
    decode = worker_command(WorkerSpec("decode", "cpu", 1), ns, REDIS, flags)
    assert decode[decode.index("--kv-transfer-backend") + 1] == "auto"  # both halves name it (the default)


def test_router_flags_reach_the_router_only(parsers):
    _, _, flags = parsers
    ns = build_parser(flags).parse_args(
        ["--max-body-bytes", "1000", "--worker-liveness-timeout", "9", "--update-weights-drain-timeout", "3"]
    )
    router = router_command(ns, REDIS, flags)
    worker = worker_command(WorkerSpec("mixed", "cpu", 0), ns, REDIS, flags)
    assert router[router.index("--max-body-bytes") + 1] == "1000"
    assert router[router.index("--worker-liveness-timeout") + 1] == "9.0"
    assert "--max-body-bytes" not in worker and "--update-weights-drain-timeout" not in router
    assert worker[worker.index("--update-weights-drain-timeout") + 1] == "3.0"


def test_serve_passes_tp_to_every_worker(parsers):
    worker, flags = parsers[1], parsers[2]
    ns = build_parser(flags).parse_args(["--tp", "2"])
    cmd = worker_command(WorkerSpec("mixed", "cpu", 0), ns, REDIS, flags)
    assert worker.parse_args(cmd[3:]).tp_size == 2


def test_prefill_and_decode_workers_of_tp_gpus_take_runs_without_overlap():
    from pdserve.shared.launch.serve.cli import _plan

    serve = build_parser()
    pd_tp2 = ["--prefill", "1", "--decode", "1", "--tp", "2"]
    specs = _plan(serve.parse_args([*pd_tp2, "--device", "cuda:0,cuda:1,cuda:2,cuda:3"]))
    assert [(s.role, s.device, s.mem_fraction_static) for s in specs] == [
        ("prefill", "cuda:0", None),
        ("decode", "cuda:2", None),
    ]
    with pytest.raises(ValueError, match="needs 6 GPUs, --device lists 4"):
        _plan(serve.parse_args([*pd_tp2, "--decode", "2", "--device", "cuda:0,cuda:1,cuda:2,cuda:3"]))
    assert [s.role for s in _plan(serve.parse_args(pd_tp2))] == ["prefill", "decode"]  # CPU: each of 2 ranks
    with pytest.raises(ValueError, match="consecutive GPUs"):
        _plan(serve.parse_args(["--device", "cuda:0,cuda:2", "--tp", "2"]))
    assert len(_plan(serve.parse_args(["--tp", "2"]))) == 1


def test_dp_places_workers_of_tp_gpus_without_overlap():
    from pdserve.shared.launch.serve.cli import _plan

    serve = build_parser()

    def devices(*flags: str) -> list[tuple[str, str]]:
        return [(s.name, s.device) for s in _plan(serve.parse_args(list(flags)))]

    four = "cuda:0,cuda:1,cuda:2,cuda:3"
    assert devices("--dp", "2", "--tp", "2", "--device", four) == [
        ("mixed-0", "cuda:0"),
        ("mixed-1", "cuda:2"),
    ]
    assert devices("--tp", "2", "--device", four) == [("mixed-0", "cuda:0"), ("mixed-1", "cuda:2")]
    assert devices("--dp-size", "4", "--device", four) == [(f"mixed-{i}", f"cuda:{i}") for i in range(4)]
    assert devices("--data-parallel-size", "2", "--tp", "2") == [("mixed-0", "cpu"), ("mixed-1", "cpu")]
    with pytest.raises(ValueError, match="needs 6 GPUs, --device lists 4"):
        devices("--dp", "3", "--tp", "2", "--device", four)
    with pytest.raises(ValueError, match="consecutive GPUs"):
        devices("--dp", "2", "--tp", "2", "--device", "cuda:0,cuda:2,cuda:3,cuda:4")
    with pytest.raises(ValueError, match="beside GPUs"):
        devices("--tp", "2", "--device", "cpu,cuda:0,cuda:1")
