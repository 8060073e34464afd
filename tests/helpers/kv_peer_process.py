"""The test's side of a KV transfer peer process (tests/helpers/kv_transfer_peer.py).

`PeerProcess()` starts `python -m tests.helpers.kv_transfer_peer` from the repository root and
waits for its ready line. `call(op, **fields)` sends a command and returns its reply; `request` and
`reply` split the two, so commands can run in two peers at once. State events seen while waiting
are kept in `events` (and `wait_state` blocks for one). `kill(sig)` signals the process; `close()`
asks it to exit and kills it if it does not.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.helpers import zygote

REPO_ROOT = Path(__file__).resolve().parents[2]


class PeerProcess:
    def __init__(self, start_timeout_s: float = 60.0, env: dict[str, str] | None = None):
        child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = zygote.popen(
            [sys.executable, "-m", "tests.helpers.kv_transfer_peer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=child_env,
        )
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"peer-{self.pid}", daemon=True).start()
        first = self._next(start_timeout_s)
        assert first.get("ready") == self.pid, first

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def _next(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"peer {self.pid}: nothing for {timeout_s:.0f} s") from None
        if line is None:
            raise RuntimeError(f"peer {self.pid} exited with status {self.proc.wait()}")
        return line

    def request(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._next(max(deadline - time.monotonic(), 0.01))
            if "reply" in line:
                return line
            self.events.append(line)

    def call(self, op: str, timeout_s: float = 60.0, **fields: Any) -> dict[str, Any]:
        self.request(op, **fields)
        return self.reply(timeout_s)

    def wait_state(self, rid: str, state: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Blocks until the peer reports `rid` in `state` (events only: call before its reply)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if event.get("rid") == rid and event.get("state") == state:
                    return event
            line = self._next(max(deadline - time.monotonic(), 0.01))
            assert "reply" not in line, f"peer {self.pid} replied before {rid} reached {state}: {line}"
            self.events.append(line)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("exit")
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
