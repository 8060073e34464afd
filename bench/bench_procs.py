"""Child processes of `bench_router` (stand-in engine, router) and the CPU they use.

Rules: every child logs its stderr to a file under the benchmark's log directory (its tail is shown
when start-up fails) and is stopped with SIGTERM, then SIGKILL after 10 s. CPU shares are user +
system seconds from /proc over a wall-clock window, in percent of one core.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from typing_extensions import Self  # typing.Self needs Python 3.11

from pdserve.shared.launch.worker_process import READY_PREFIX, http_status, parse_ready_line


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0.0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of pid (Linux /proc; empty once it is gone)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its log file; `stop()` sends SIGTERM, then SIGKILL after 10 s."""

    def __init__(self, cmd: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)

    def cpu_s(self) -> float:
        """Its CPU and that of its live children (`router --processes N` works in its children)."""
        pid = self.popen.pid
        return process_cpu_s(pid) + sum(process_cpu_s(child) for child in child_pids(pid))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def start_standin(
    tokenizer_dir: str, model: str, step_ms: float, token_ids: list[int], first_now: bool, logs: Path
) -> tuple[Proc, str]:
    """Starts the stand-in engine on a free port; returns it and its ZMQ address."""
    cmd = [
        sys.executable,
        "-m",
        "pdserve.bench.standin_process",
        "--port",
        "0",
        "--step-ms",
        str(step_ms),
        "--tokenizer-path",
        tokenizer_dir,
        "--model-path",
        model,
        "--token-ids",
        ",".join(map(str, token_ids)),
    ]
    if first_now:
        cmd.append("--first-token-now")
    proc = Proc(cmd, logs / f"standin-{step_ms}.log")
    assert proc.popen.stdout is not None
    line = proc.popen.stdout.readline()
    if not line.startswith(READY_PREFIX):
        proc.stop()
        raise RuntimeError(f"stand-in did not start:\n{proc.log_tail()}")
    return proc, parse_ready_line(line.strip())["zmq"]


def start_router(worker_addr: str, extra_args: list[str], logs: Path) -> tuple[Proc, str]:
    """Starts `router --worker-addr` on a free port; returns it and its URL once /health is 200."""
    port = free_port()
    exe = shutil.which("router")
    if exe is None:
        raise RuntimeError("no `router` command on PATH: pip install -e . first")
    cmd = [exe, "--host", "127.0.0.1", "--port", str(port), "--worker-addr", worker_addr, *extra_args]
    proc = Proc(cmd, logs / f"router-{port}.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    # each check is a fresh connection, which may reach any of `--processes N`: all must be healthy
    while not all(http_status(url + "/health") == 200 for _ in range(8)):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"router did not become healthy:\n{proc.log_tail()}")
        time.sleep(0.2)
    return proc, url


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy since boot (/proc/stat: all but idle, iowait)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """CPU seconds of the given processes (and this one, "client") over a window, as % of one core;
    "others" is what the rest of the machine used meanwhile (other users' work competes for cores)."""

    def __init__(self, procs: dict[str, Proc]):
        self.procs = procs

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self.c0 = {name: p.cpu_s() for name, p in self.procs.items()}
        self.m0 = process_cpu_s(os.getpid())
        self.busy0 = machine_busy_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        self.cpu = {name: 100.0 * (p.cpu_s() - self.c0[name]) / wall for name, p in self.procs.items()}
        self.cpu["client"] = 100.0 * (process_cpu_s(os.getpid()) - self.m0) / wall
        busy = 100.0 * (machine_busy_s() - self.busy0) / wall
        self.cpu["others"] = max(busy - sum(self.cpu.values()), 0.0)
        self.cpu["loadavg_1m"] = os.getloadavg()[0]


def start_http_floor(step_ms: float, logs: Path) -> tuple[Proc, str]:
    """Starts the HTTP floor server (bench/http_floor.py) on a free port; returns it and its URL."""
    from pdserve.bench.http_floor import READY_PREFIX as FLOOR_READY

    cmd = [sys.executable, "-m", "pdserve.bench.http_floor", "--port", "0", "--step-ms", str(step_ms)]
    return _start_url_server(cmd, FLOOR_READY, logs / f"http-floor-{step_ms}.log")


def start_zmq_relay(worker_addr: str, logs: Path) -> tuple[Proc, str]:
    """Starts the relay floor (bench/zmq_relay.py) before `worker_addr`; returns it and its URL."""
    from pdserve.bench.zmq_relay import READY_PREFIX as RELAY_READY

    cmd = [sys.executable, "-m", "pdserve.bench.zmq_relay", "--port", "0", "--worker-addr", worker_addr]
    return _start_url_server(cmd, RELAY_READY, logs / "zmq-relay.log")


def _start_url_server(cmd: list[str], ready_prefix: str, log_path: Path) -> tuple[Proc, str]:
    """Runs cmd, waits for its `<ready_prefix> url=...` line; returns the process and the URL."""
    proc = Proc(cmd, log_path)
    assert proc.popen.stdout is not None
    line = proc.popen.stdout.readline()
    if not line.startswith(ready_prefix):
        proc.stop()
        raise RuntimeError(f"{cmd[2]} did not start:\n{proc.log_tail()}")
    return proc, line.strip().split("url=", 1)[1]
