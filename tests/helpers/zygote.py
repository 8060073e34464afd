"""`popen(cmd, ...)`: subprocess.Popen for `python -m <module> ...` commands, started by forking a
pre-imported interpreter (tests/helpers/zygote_main.py says why and how) instead of a cold one.

The process is a real one, with its own pid, stdio, environment and sockets; what differs from
Popen is only that torch and transformers are already imported when the module's main runs. The
returned object answers the part of Popen's interface the tests use (pid, args, returncode, poll,
wait, send_signal, terminate, kill, stdin/stdout/stderr pipes). Anything else, or a server that
could not start, falls back to subprocess.Popen.

One server per test process, started on first use (`start()` earlier to overlap its imports).
"""

from __future__ import annotations

import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, Any

import msgpack

_SERVER_MODULE = "tests.helpers.zygote_main"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ZygoteProcess:
    """A child of the fork server, seen through Popen's interface."""

    def __init__(self, server: _Server, args: list[str], pid: int):
        self._server = server
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: IO | None = None
        self.stdout: IO | None = None
        self.stderr: IO | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout_s=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout_s=timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # exited, not reaped yet
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # One thread: numpy starts its BLAS threads at import unless told, and torch reads its thread
        # count at import; a fork copies no threads. Children keep one whatever their environment says
        # (the suite gives them one: tests/conftest.py).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # fd 3 in the server: pass_fds keeps the descriptor's number, so move it there first
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            cwd=_REPO_ROOT,
            env=env,
        )
        theirs.close()
        self._sock = ours
        self._spawned: queue.Queue[int | None] = queue.Queue()
        self._exits: dict[int, int] = {}
        self._exited = threading.Condition()
        self._lock = threading.Lock()  # one request in flight: replies come back in order
        self.alive = True
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            message = msgpack.unpackb(data)
            if "pid" in message:
                self._spawned.put(message["pid"])
            else:
                with self._exited:
                    self._exits[message["exited"]] = message["code"]
                    self._exited.notify_all()
        self.alive = False
        self._spawned.put(None)
        with self._exited:
            self._exited.notify_all()

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> int | None:
        request = msgpack.packb({"argv": argv, "env": env, "cwd": cwd})
        with self._lock:
            if not self.alive:
                return None
            try:
                socket.send_fds(self._sock, [request], fds)
            except OSError:  # the server is gone
                return None
            return self._spawned.get()

    def exit_code(self, pid: int, timeout_s: float | None) -> int | None:
        with self._exited:
            self._exited.wait_for(lambda: pid in self._exits or not self.alive, timeout_s)
            return self._exits.get(pid)


# Runs in the server's interpreter: moves the control socket to fd 3, then becomes zygote_main.
_BOOT = (
    "import os, runpy, sys; fd = int(sys.argv[1]); "
    "fd != 3 and (os.dup2(fd, 3), os.close(fd)); sys.argv = sys.argv[:1]; "
    f"runpy.run_module({_SERVER_MODULE!r}, run_name='__main__', alter_sys=True)"
)

_server: _Server | None = None
_server_lock = threading.Lock()


def start() -> _Server:
    """The test process's fork server, started now if it is not running."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive:
            _server = _Server()
        return _server


def _stream_fd(spec: Any, default: int) -> tuple[int, int | None]:
    """(fd to send, our end of a pipe or None) for a Popen stdio argument."""
    if spec is None:
        return os.dup(default), None
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return (r, w) if default == 0 else (w, r)
    if isinstance(spec, int):
        return os.dup(spec), None
    return os.dup(spec.fileno()), None


def _fork(cmd: list[str], stdio: tuple[Any, Any, Any], text: bool, env: dict | None, cwd: Any) -> Any:
    """The forked child as a ZygoteProcess, or None when the server is gone."""
    server = start()
    ends = [_stream_fd(spec, n) for n, spec in enumerate(stdio)]
    try:
        pid = server.spawn(
            cmd[1:], dict(os.environ if env is None else env), str(cwd or os.getcwd()), [e[0] for e in ends]
        )
    finally:
        for sent, _ in ends:
            os.close(sent)
    if pid is None:
        for _, ours in ends:
            if ours is not None:
                os.close(ours)
        return None
    proc = ZygoteProcess(server, cmd, pid)
    streams = []
    for n, (_, ours) in enumerate(ends):
        if ours is None:
            streams.append(None)
            continue
        raw = open(ours, "wb" if n == 0 else "rb")  # noqa: SIM115 (the process's pipe, closed by its owner)
        streams.append(io.TextIOWrapper(raw, write_through=n == 0) if text else raw)  # as Popen wraps them
    proc.stdin, proc.stdout, proc.stderr = streams
    return proc


def popen(
    cmd: list[str],
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    text: bool = False,
    env: dict[str, str] | None = None,
    cwd: Any = None,
    **kwargs: Any,
) -> Any:
    """subprocess.Popen(cmd, ...) for `[sys.executable, "-m", module, ...]`, forked from the server."""
    forkable = (
        not kwargs and len(cmd) > 2 and cmd[:2] == [sys.executable, "-m"] and stderr != subprocess.STDOUT
    )
    proc = _fork(cmd, (stdin, stdout, stderr), text, env, cwd) if forkable else None
    return proc or subprocess.Popen(
        cmd, stdin=stdin, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd, **kwargs
    )


def run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout) through popen()."""
    proc = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    if isinstance(proc, subprocess.Popen):
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    captured: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=name, s=stream: captured.__setitem__(n, s.read()), daemon=True)
        for name, stream in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    for reader in readers:
        reader.join()
    return subprocess.CompletedProcess(cmd, code, captured["out"], captured["err"])
