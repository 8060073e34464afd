"""The parent of `router --processes N`: starts N router children on one port, keeps them running.

Life cycle:
1. pick the port (`--port 0`: a free one now, so that every child binds the same) and make a fresh
   run directory (metrics files, control sockets: router/processes.py);
2. start the N children (`python -m pdserve.router.cli <same flags> --port P`, ROLE_ENV set) and
   read each one's stdout; once every child printed its ready line, print ours (same format);
3. a child that exits is started again after a back-off (RestartBackoff), logged; its live gauges are
   dropped from the metrics files. A child that exits before the first ready line makes the parent
   stop the others and exit with status 1 (a wrong flag fails at once instead of looping);
4. SIGTERM or SIGINT: SIGTERM to every child (each stops gracefully), SIGKILL to one still running
   after `STOP_TIMEOUT_S`, the run directory removed, exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from pdserve.router.processes import ProcessRole, RestartBackoff, child_argv

logger = logging.getLogger("pdserve.router")

STOP_TIMEOUT_S = 75.0  # a child lets its streams end first (aiohttp's shutdown timeout is 60 s)
_PR_SET_PDEATHSIG = 1


def pick_port(host: str) -> int:
    """A free port on host, for all children to bind (each with SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux), so that no
    router outlives its supervisor holding the port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, argv: list[str], host: str, port: int, count: int, ready_prefix: str):
        self.argv = argv
        self.host = host
        self.port = port or pick_port(host)
        self.count = count
        self.ready_prefix = ready_prefix
        self.run_dir = tempfile.mkdtemp(prefix="pdserve-router-")
        self.policy = RestartBackoff()
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready = [asyncio.Event() for _ in range(count)]
        self.all_ready = False
        self.stopping = asyncio.Event()
        self.exit_status = 0

    async def run(self) -> int:
        os.mkdir(os.path.join(self.run_dir, "metrics"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        tasks = [asyncio.create_task(self._keep_running(i), name=f"router-{i}") for i in range(self.count)]
        try:
            await self._announce_when_ready()
            await self.stopping.wait()
            logger.info("stopping %d router processes", self.count)
            await self._stop_children()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.exit_status

    async def _announce_when_ready(self) -> None:
        waits = [asyncio.create_task(e.wait()) for e in self.ready]
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([asyncio.gather(*waits), stop], return_when=asyncio.FIRST_COMPLETED)
        for task in (*waits, stop):
            task.cancel()
        if all(e.is_set() for e in self.ready) and not self.stopping.is_set():
            self.all_ready = True
            print(f"{self.ready_prefix} url=http://{self.host}:{self.port}", flush=True)

    async def _keep_running(self, index: int) -> None:
        role = ProcessRole(index, self.count, self.run_dir)
        delay = 0.0
        while not self.stopping.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pdserve.router.cli",
                *child_argv(self.argv, self.port),
                stdout=asyncio.subprocess.PIPE,
                env=role.child_env(os.environ),
                preexec_fn=_die_with_parent,
            )
            self.procs[index] = proc
            if self.stopping.is_set():  # asked to stop while this one was starting
                proc.send_signal(signal.SIGTERM)
            await self._read_stdout(index, proc)
            status = await proc.wait()
            self.procs.pop(index, None)
            self._forget_metrics(proc.pid)
            if self.stopping.is_set():
                return
            if not self.all_ready:
                logger.error("router process %d exited with status %s before it was ready", index, status)
                self.exit_status = 1
                self.stopping.set()
                return
            delay = self.policy.next_delay(delay, time.monotonic() - started)
            logger.warning(
                "router process %d (pid %d) exited with status %s: restarting in %.1f s",
                index,
                proc.pid,
                status,
                delay,
            )
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _read_stdout(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Until the child closes stdout: its ready line marks it ready, other lines pass through."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(self.ready_prefix):
                self.ready[index].set()
            else:
                print(line, flush=True)

    def _forget_metrics(self, pid: int) -> None:
        """Drops the live gauges of a process that is gone (its counters stay: they still count)."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, os.path.join(self.run_dir, "metrics"))

    async def _stop_children(self) -> None:
        procs = list(self.procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except (asyncio.TimeoutError, TimeoutError):
                logger.warning("router process %d did not stop in %.0f s: killed", proc.pid, STOP_TIMEOUT_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def supervise(argv: list[str], host: str, port: int, count: int, ready_prefix: str) -> int:
    """Runs `count` router processes on host:port until SIGTERM or SIGINT; the exit status."""
    return await Supervisor(argv, host, port, count, ready_prefix).run()
