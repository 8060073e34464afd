"""A follower rank's process (rank 1..N-1 of a `--tp N` worker), started by tp_ranks.py (or, for
the ranks of another host, by that host's launcher: tp_node.py, then its parent).

It joins the worker's process group, builds its runner and runs rank 0's forward passes
(shared/engine/tp_follower.py) until rank 0 is gone or it gets SIGTERM. It binds no client socket
and prints nothing to stdout; logs go to stderr with its rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Callable

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.tp_follower import build_follower_runner, serve_follower
from pdserve.shared.launch.tp_ranks import join_process_group, rank_device

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """SIGKILL when the parent exits (Linux: when the thread that started this process ends, the
    worker's main thread); elsewhere the loop's parent check does it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def parent_alive_check(parent_pid: int) -> Callable[[], bool]:
    """Whether rank 0 still runs: its pidfd turns readable when it exits (whoever this process's
    parent is: rank 0 itself, or a launcher that forked it); by the parent pid where pidfds are
    missing (before Linux 5.3), or when rank 0 is already gone (then the check fails at once)."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        return lambda: os.getppid() == parent_pid
    exited = select.poll()
    exited.register(pidfd, select.POLLIN)
    return lambda: not exited.poll(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tp_follower_main")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--engine-args", required=True, help="the worker's EngineArgs as JSON")
    ns = parser.parse_args(argv)
    _die_with_parent()
    # a terminal's Ctrl-C reaches the whole process group: rank 0 alone decides when ranks stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # rank 0's stop: unwind, so the loop's `finally` closes this rank's KV managers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s tp-rank-{ns.rank} %(name)s: %(message)s",
    )
    args = EngineArgs(**json.loads(ns.engine_args))
    args.device = rank_device(args.device, ns.rank % args.tp_ranks_per_node)  # its place on this host
    join_process_group(args.device, ns.rank, ns.world_size, ns.init_method, args.tp_ranks_per_node)
    runner = build_follower_runner(args)
    serve_follower(runner, keep_going=parent_alive_check(ns.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
