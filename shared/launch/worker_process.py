"""Starting a `worker` process from Python and waiting until it serves (demo, tests, `serve`).

Readiness is the worker's stdout line `pdserve worker ready role=... zmq=... http=...` (prefill and
decode roles add `kv=<KV transfer endpoint>`), printed after the warm-up, then confirmed with
`/health` 200. Reading that line (instead of choosing ports in advance) lets the worker bind free
ports itself (`--port 0`), so parallel starts never race for one.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO

from typing_extensions import Self  # typing.Self needs Python 3.11

READY_PREFIX = "pdserve worker ready"


def parse_ready_line(line: str) -> dict[str, str]:
    """`pdserve worker ready role=mixed zmq=tcp://h:p http=http://h:q` -> {"role": ..., "zmq": ..., ...}."""
    fields = line[len(READY_PREFIX) :].split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The HTTP status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


class WorkerProcess:
    """One `worker` subprocess. `args` are the worker's flags (`--port 0` recommended); `popen`
    starts it (subprocess.Popen, or a launcher with its interface)."""

    def __init__(
        self,
        args: list[str],
        stderr: IO | int | None = None,
        env: dict[str, str] | None = None,
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
    ):
        cmd = [sys.executable, "-m", "pdserve.shared.launch.worker_cli", *args]
        self.proc = popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})}
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, name="worker-stdout", daemon=True).start()
        self.zmq_address: str | None = None
        self.http_url: str | None = None
        self.kv_address: str | None = None

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # end of stream: the process exited

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Blocks until the ready line and a 200 from /health (when HTTP is on).

        Raises RuntimeError if the process exits first, TimeoutError past timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.zmq_address is None:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"worker {self.pid} not ready after {timeout_s:.0f} s") from None
            if line is None:
                raise RuntimeError(f"worker exited with status {self.proc.wait()} before it was ready")
            if line.startswith(READY_PREFIX):
                fields = parse_ready_line(line)
                self.zmq_address = fields["zmq"]
                self.http_url = None if fields.get("http", "off") == "off" else fields["http"]
                self.kv_address = fields.get("kv")  # prefill and decode roles
        while self.http_url is not None and http_status(self.http_url + "/health") != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.pid}: /health not 200 after {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Sends sig and waits for the exit status; kills the process if it outlives timeout_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                pass
