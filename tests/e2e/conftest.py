"""Process fixtures for end-to-end tests: real `worker` processes on loopback, free ports.

`worker_launcher(*flags, env=None)` starts `worker --port 0 <flags>` (with `env` added to the environment) (the worker binds free ports and reports
them on its ready line), waits for /health 200, and returns the WorkerProcess. Its stderr goes to a
log file whose tail is shown when start-up fails. Every process started is stopped (SIGTERM, then
SIGKILL) when the module's tests are done.

`router_launcher(*flags, healthy=True)` starts `router --port 0 <flags>`, reads its ready line and,
with `healthy`, waits for /health 200; the RouterProcess has the base `url`. Stopped like workers.

`redis_url` is a real `redis-server` on a free loopback port (shared/cluster/redis_server.py), one per module.

Workers and routers are forked from a pre-imported interpreter (tests/helpers/zygote.py): real
processes running the real `python -m` entry points, ready in ~0.7 s instead of ~7 s of imports.
`serve`'s own children and the followers a `worker --tp N` starts still start cold, as users' do.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

import pytest

from pdserve.shared.cluster.redis_server import EmbeddedRedis
from pdserve.shared.launch.worker_process import WorkerProcess, http_status
from tests.helpers import zygote

STARTUP_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def worker_launcher(tmp_path_factory) -> Iterator[Callable[..., WorkerProcess]]:
    logs_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[tuple[WorkerProcess, object]] = []

    def launch(
        *flags: str, timeout_s: float = STARTUP_TIMEOUT_S, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        log_path = logs_dir / f"worker-{len(started)}.log"
        log = open(log_path, "w")  # noqa: SIM115 (closed at teardown, after the process exits)
        worker = WorkerProcess(["--port", "0", *flags], stderr=log, env=env, popen=zygote.popen)
        started.append((worker, log))
        try:
            worker.wait_ready(timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"{exc}\n--- worker stderr ---\n{tail}") from exc
        return worker

    yield launch
    for worker, log in started:
        worker.__exit__(None, None, None)
        log.close()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama checkpoint (tests/helpers/tiny_models.py), one per module."""
    from tests.helpers.tiny_models import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url


class RouterProcess:
    """One `router` subprocess; `url` is set once its ready line arrived."""

    READY_PREFIX = "pdserve router ready"

    def __init__(self, flags: list[str], stderr: IO | int | None = None):
        cmd = [sys.executable, "-m", "pdserve.router.cli", "--port", "0", *flags]
        self.proc = zygote.popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, name="router-stdout", daemon=True).start()
        self.url: str | None = None

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout_s: float, healthy: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        while self.url is None:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"router {self.proc.pid} not ready after {timeout_s:.0f} s") from None
            if line is None:
                raise RuntimeError(f"router exited with status {self.proc.wait()} before it was ready")
            if line.startswith(self.READY_PREFIX):
                self.url = line.split("url=", 1)[1].strip()
        while healthy and http_status(self.url + "/health") != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {self.proc.pid}: /health not 200 after {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def router_launcher(tmp_path_factory) -> Iterator[Callable[..., RouterProcess]]:
    logs_dir = tmp_path_factory.mktemp("router-logs")
    started: list[tuple[RouterProcess, object]] = []

    def launch(*flags: str, healthy: bool = True, timeout_s: float = STARTUP_TIMEOUT_S) -> RouterProcess:
        log_path = logs_dir / f"router-{len(started)}.log"
        log = open(log_path, "w")  # noqa: SIM115 (closed at teardown, after the process exits)
        router = RouterProcess(list(flags), stderr=log)
        started.append((router, log))
        try:
            router.wait_ready(timeout_s, healthy)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"{exc}\n--- router stderr ---\n{tail}") from exc
        return router

    yield launch
    for router, log in started:
        router.stop()
        log.close()
