"""The worker's small HTTP port: `/health` and Prometheus `/metrics`, served from a daemon thread.

Rules:
- `/health` answers 200 only while the worker is ready (model loaded and one warm-up forward done)
  and not shutting down; 503 otherwise. Compose health checks and the demo poll it.
- `/metrics` renders the worker's own registry; it never reads the engine (see metrics.py).
- The server starts before the model loads, so a probe sees 503 (not "connection refused") while
  the worker is still loading.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pdserve.shared.worker.metrics import WorkerMetrics

# serve_forever's check for shutdown(): its 0.5 s default was half a second of every worker's stop
SHUTDOWN_POLL_S = 0.05

logger = logging.getLogger(__name__)


class HealthState:
    """Readiness as the loop thread sets it and the HTTP thread reads it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stopping = threading.Event()

    def set_ready(self) -> None:
        self._ready.set()

    def set_stopping(self) -> None:
        self._stopping.set()

    @property
    def healthy(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def status_text(self) -> str:
        if self._stopping.is_set():
            return "shutting down"
        return "ok" if self._ready.is_set() else "loading"


def _handler_class(state: HealthState, metrics: WorkerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                self._reply(200 if state.healthy else 503, state.status_text.encode() + b"\n", "text/plain")
            elif path == "/metrics":
                body, content_type = metrics.render()
                self._reply(200, body, content_type)
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            logger.debug("http %s " + format, self.address_string(), *args)

    return Handler


class HealthMetricsServer:
    """A ThreadingHTTPServer on (host, port) in a daemon thread; port 0 picks a free port."""

    def __init__(self, host: str, port: int, state: HealthState, metrics: WorkerMetrics):
        self._server = ThreadingHTTPServer((host, port), _handler_class(state, metrics))
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(SHUTDOWN_POLL_S,), name="worker-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
