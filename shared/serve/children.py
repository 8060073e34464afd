"""One child process of `serve`: its output echoed with a name prefix, its tail kept, its ready line found.

Rules:
- The child runs in its own session: a Ctrl-C typed at the terminal reaches `serve` alone, which
  then stops the children in order (router, workers, Redis) instead of all at once.
- stdout and stderr are merged into one pipe, read by one daemon thread: each line is echoed to
  `echo` as `[name] line`, kept in a bounded tail (for error messages), and checked for the
  worker's ready line (`pdserve worker ready ...`, see shared/worker/launch.py).
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

from pdserve.shared.worker.launch import READY_PREFIX, parse_ready_line

TAIL_LINES = 40


class ChildProcess:
    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        echo: TextIO | None = sys.stderr,
    ):
        self.name = name
        self.cmd = cmd
        self._echo = echo
        self._echo_lock = threading.Lock()
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.ready = threading.Event()  # set when a worker's ready line arrives
        self.ready_fields: dict[str, str] = {}
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def tail(self) -> str:
        """The last lines the child printed (waits briefly for the reader to catch up after an exit)."""
        if self.proc.poll() is not None:
            self._reader.join(1.0)
        return "\n".join(self._tail)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            if line.startswith(READY_PREFIX):
                self.ready_fields = parse_ready_line(line)
                self.ready.set()
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
