"""Ranks on several hosts (`--nnodes`): the flags, and the liveness protocol over rank 0's store.

- Bad combinations are refused with the flag's name before anything starts (worker exit 2; serve,
  which runs on one host, refuses --nnodes); SGLang's --nccl-init-addr spelling is accepted.
- BeatWatch: a counter that stops moving for STALE_S is stale; a lenient watch waits for a first beat.
- NodeWatch against a real TCPStore: a node's report of a dead rank reaches `on_rank_exit` once,
  with its rank and status; `close()` announces the close and waits for the launchers' ack.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from pdserve.shared.args import EngineArgs, add_engine_args, engine_args_from, split_host_port
from pdserve.shared.cluster.redis_server import free_port
from pdserve.shared.engine.tp_steps import step_channel_host
from pdserve.shared.launch import worker_cli
from pdserve.shared.launch.serve.cli import _plan
from pdserve.shared.launch.serve.cli import build_parser as serve_parser
from pdserve.shared.launch.serve.plan import PlanError
from pdserve.shared.launch.tp_node_watch import (
    CLOSED_KEY,
    CLOSING_KEY,
    DOWN_KEY,
    STALE_S,
    BeatWatch,
    NodeWatch,
    down_value,
)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "h:1"}, "--tp 3 does not split over --nnodes 2"),
        (
            {"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"},
            r"--node-rank must be in \[0, 2\)",
        ),
        ({"tp_size": 2, "nnodes": 2}, "--nnodes 2 needs --dist-init-addr HOST:PORT"),
        ({"tp_size": 2, "nnodes": 2, "dist_init_addr": "h"}, "--dist-init-addr must be HOST:PORT"),
        ({"tp_size": 2, "nnodes": 2, "dist_init_addr": "h:99999"}, "--dist-init-addr must be HOST:PORT"),
        ({"nnodes": 0}, "--nnodes must be >= 1"),
    ],
)
def test_bad_node_flags_name_the_flag(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model_path="m", **overrides).validate()


def test_node_flags_and_sglang_spellings_parse():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for spelling in ("--dist-init-addr", "--nccl-init-addr", "--nccl-init"):
        argv = ["--tp", "4", "--nnodes", "2", "--node-rank", "1", spelling, "node0:5000"]
        args = engine_args_from(parser.parse_args(argv))
        assert (args.dist_init_addr, args.tp_ranks_per_node, args.node_rank) == ("node0:5000", 2, 1)
    assert split_host_port("[::1]:29500") == ("::1", 29500)


@pytest.mark.parametrize(
    "argv",
    [
        ["--tp", "3", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:1"],
        ["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "127.0.0.1:1"],
        ["--tp", "2", "--nnodes", "2", "--node-rank", "1"],
    ],
)
def test_the_worker_refuses_bad_node_flags_before_starting(argv: list[str], capsys):
    assert worker_cli.main(["--port", "0", *argv]) == worker_cli.EXIT_USAGE
    assert capsys.readouterr().out == ""


def test_serve_runs_on_one_host():
    ns = serve_parser().parse_args(["--tp", "2", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:1"])
    with pytest.raises(PlanError, match="serve runs on one host"):
        _plan(ns)


def test_the_step_channel_binds_where_other_hosts_reach_rank_0():
    assert step_channel_host(EngineArgs(tp_size=2)) == "127.0.0.1"
    across = EngineArgs(tp_size=2, nnodes=2, dist_init_addr="localhost:5000")
    assert step_channel_host(across) == "127.0.0.1"  # the --dist-init-addr host, resolved


def test_a_beat_is_stale_when_its_counter_stops_moving():
    watch = BeatWatch(started_at=100.0)
    assert not watch.stale(100.0 + STALE_S)
    assert watch.stale(100.1 + STALE_S)  # never beat: counted from the watch's start
    watch.observe(1, now=104.0)
    watch.observe(1, now=104.0 + STALE_S)  # the same value: no news
    assert not watch.stale(104.0 + STALE_S) and watch.stale(104.1 + STALE_S)
    lenient = BeatWatch(started_at=0.0, strict=False)
    assert not lenient.stale(1000.0)  # waits for rank 0's first beat
    lenient.observe(3, now=1000.0)
    assert lenient.stale(1000.1 + STALE_S)


@pytest.fixture
def store_addr():
    port = free_port()
    master = dist.TCPStore(
        "127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False
    )
    yield f"127.0.0.1:{port}", master


def test_node_watch_hears_a_dead_rank_and_announces_its_close(store_addr):
    address, master = store_addr
    exits: list[tuple[int, int]] = []
    args = EngineArgs(tp_size=4, nnodes=2, dist_init_addr=address)
    watch = NodeWatch(args, lambda rank, status: exits.append((rank, status)))
    master.add("pdserve/tp/beat/1", 1)  # node 1's launcher beats
    master.set(DOWN_KEY, down_value(3, -9))  # its rank 3 was killed
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)  # a second report would come within a beat
    assert exits == [(3, -9)]
    assert master.add("pdserve/tp/beat/0", 0) >= 1  # rank 0 beat meanwhile
    master.add(CLOSED_KEY, 1)  # node 1 acknowledges the close at once
    started = time.monotonic()
    watch.close()
    assert master.get(CLOSING_KEY) == b"1" and time.monotonic() - started < 2.0
