"""Process fixtures for end-to-end tests: real `worker` processes on loopback, free ports.

`worker_launcher(*flags)` starts `worker --port 0 <flags>` (the worker binds free ports and reports
them on its ready line), waits for /health 200, and returns the WorkerProcess. Its stderr goes to a
log file whose tail is shown when start-up fails. Every process started is stopped (SIGTERM, then
SIGKILL) when the module's tests are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pdserve.shared.worker.launch import WorkerProcess

STARTUP_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def worker_launcher(tmp_path_factory) -> Iterator[Callable[..., WorkerProcess]]:
    logs_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[tuple[WorkerProcess, object]] = []

    def launch(*flags: str, timeout_s: float = STARTUP_TIMEOUT_S) -> WorkerProcess:
        log_path = logs_dir / f"worker-{len(started)}.log"
        log = open(log_path, "w")  # noqa: SIM115 (closed at teardown, after the process exits)
        worker = WorkerProcess(["--port", "0", *flags], stderr=log)
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
