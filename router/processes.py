"""Several router processes on one port: who each one is, how it is started, when it is restarted.

    role = ProcessRole.from_env(os.environ)     # in a child: index, count, the parent's run directory
    env = role.child_env(os.environ)            # in the parent: what a child is started with
    capacity_share(total_slots, role.count)     # this process's share of the workers' running slots

`router --processes N` (N > 1) runs N children of the same command on one host and port: each binds
it with SO_REUSEPORT (the kernel spreads connections over them) and is a whole router, with its own
connections to every worker. The parent (router/supervisor.py) only starts, watches and stops them.
A child learns its place from the environment the parent gives it: ROLE_ENV ("INDEX/COUNT/RUN_DIR")
and PROMETHEUS_MULTIPROC_DIR (prometheus_client keeps every process's metrics in files there, summed
at each scrape). The run directory also holds each child's control socket, on which siblings pass
on `/abort_request` (router/native/sibling_abort.py). Without ROLE_ENV a router is the only one
(index 0 of 1).

No I/O here: the supervisor does the processes, these are its rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ROLE_ENV = "PDSERVE_ROUTER_PROCESS"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it


@dataclass(frozen=True)
class ProcessRole:
    index: int = 0
    count: int = 1
    run_dir: str | None = None  # the parent's temporary directory; None: a router on its own

    @property
    def is_child(self) -> bool:
        return self.run_dir is not None

    @property
    def metrics_dir(self) -> str | None:
        return os.path.join(self.run_dir, "metrics") if self.run_dir else None

    def control_socket(self, index: int) -> str:
        """The Unix socket on which process `index` takes its siblings' requests."""
        assert self.run_dir is not None
        return os.path.join(self.run_dir, f"control-{index}.sock")

    def sibling_sockets(self) -> list[str]:
        return [self.control_socket(i) for i in range(self.count) if i != self.index]

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        assert self.run_dir is not None and self.metrics_dir is not None
        return {
            **base,
            ROLE_ENV: f"{self.index}/{self.count}/{self.run_dir}",
            METRICS_DIR_ENV: self.metrics_dir,
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProcessRole:
        raw = env.get(ROLE_ENV)
        if not raw:
            return cls()
        index, count, run_dir = raw.split("/", 2)
        role = cls(int(index), int(count), run_dir)
        if not 0 <= role.index < role.count:
            raise ValueError(f"{ROLE_ENV}={raw!r}: index out of range")
        return role


def child_argv(argv: list[str], port: int) -> list[str]:
    """The parent's own arguments, with the port every child binds (argparse keeps the last --port:
    with `--port 0` the parent picked one, so that all children share it)."""
    return [*argv, "--port", str(port)]


def capacity_share(total: int | None, count: int) -> int | None:
    """This process's running slots of the workers' `total`, so that `count` processes together
    never admit more than the workers run (at least 1, so that each process still serves)."""
    if total is None:
        return None
    return max(total // count, 1)


@dataclass(frozen=True)
class RestartBackoff:
    """Back-off before a child that exited is started again: `first_delay_s`, doubled at each exit
    that follows a short run, up to `max_delay_s`; a child that ran `stable_after_s` starts afresh."""

    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    stable_after_s: float = 30.0

    def next_delay(self, previous_delay_s: float, ran_s: float) -> float:
        if previous_delay_s <= 0 or ran_s >= self.stable_after_s:
            return self.first_delay_s
        return min(previous_delay_s * 2, self.max_delay_s)
