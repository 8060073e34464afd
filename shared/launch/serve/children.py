"""One child process of `serve`: its output echoed with a name prefix, its tail kept, its ready line found.

Rules:
- The child runs in its own session: a Ctrl-C typed at the terminal reaches `serve` alone, which
  then stops the children in order (router, workers, Redis) instead of all at once.
- stdout and stderr are merged into one pipe, read by one daemon thread: each line is echoed to
  `echo` as `[name] line`, kept in a bounded tail (for error messages), and checked for the
  child's ready line (`ready_prefix`: the worker's `pdserve worker ready ...`, see
  shared/launch/worker_process.py, or the router's `pdserve router ready ...`).
- `restart()` runs the same command again once the process exited: a new pid, a new `ready` event
  (the old one stays set for whoever still holds it), the tail carried on. The reader thread of
  each run only ever touches that run's pipe and event.
- `stop()` sends SIGTERM, waits `grace_s`, then SIGKILLs; it is idempotent and returns the status.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from typing import TextIO

from pdserve.shared.launch.worker_process import READY_PREFIX

TAIL_LINES = 40


def parse_ready_fields(line: str, prefix: str) -> dict[str, str]:
    """`<prefix> role=mixed zmq=tcp://h:p` -> {"role": "mixed", "zmq": "tcp://h:p"}."""
    return dict(f.split("=", 1) for f in line[len(prefix) :].split() if "=" in f)


class ChildProcess:
    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        echo: TextIO | None = sys.stderr,
        ready_prefix: str = READY_PREFIX,
    ):
        self.name = name
        self.cmd = cmd
        self._env = {**os.environ, **(env or {})}
        self._ready_prefix = ready_prefix
        self._echo = echo
        self._echo_lock = threading.Lock()
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._spawn()

    def _spawn(self) -> None:
        self.ready = threading.Event()  # set when this run's ready line arrives
        self.ready_fields: dict[str, str] = {}
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=self._env,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self.proc, self.ready), name=f"{self.name}-output", daemon=True
        )
        self._reader.start()

    def restart(self) -> None:
        """Runs the command again; the previous run must have exited."""
        if self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is still running (pid {self.proc.pid})")
        self._reader.join(1.0)  # its last lines go to the tail before the new run's
        self._spawn()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def tail(self) -> str:
        """The last lines the child printed (waits briefly for the reader to catch up after an exit)."""
        if self.proc.poll() is not None:
            self._reader.join(1.0)
        return "\n".join(self._tail)

    def _read(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            if line.startswith(self._ready_prefix) and not ready.is_set():
                self.ready_fields = parse_ready_fields(line, self._ready_prefix)
                ready.set()
            if self._echo is not None:
                with self._echo_lock:
                    try:
                        self._echo.write(f"[{self.name}] {line}\n")
                        self._echo.flush()
                    except (OSError, ValueError):  # our own stderr closed: keep draining the pipe
                        self._echo = None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self, grace_s: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(grace_s)

    def wait(self, grace_s: float) -> int:
        """The exit status, SIGKILLing the child if it is still running after grace_s."""
        try:
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()
