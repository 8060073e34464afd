"""The fork server behind tests/helpers/zygote.py: imports the heavy libraries once, then forks a
child per request that runs `python -m <module> <args>` in the state a fresh interpreter would
reach after those imports.

Why: every `worker` process spends ~6 s importing torch and transformers (whose model configs pull
in torch.distributed.tensor, accelerate and sympy) before it reads its flags; an end-to-end run
starts ~90 workers and ~70 routers. Forked from here, a tiny model's worker is ready in ~0.7 s
(~7.3 s cold). Only third-party libraries are imported here, none of the product's modules: those
read the environment when they load (Triton kernels pick interpreter or compiler at decoration)
and must see the child's.

Protocol (SOCK_SEQPACKET on fd 3, msgpack): the client sends {"argv", "env", "cwd"} with three
file descriptors (stdin, stdout, stderr; a closed pipe end or /dev/null where it wants none); the
server forks and answers {"pid"}, and later {"exited": pid, "code": returncode} when it reaps the
child (a signal's death as -signum, as subprocess reports it). The server leaves when the client's
end closes; the children it leaves behind run on, as Popen's do when their parent exits.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

import msgpack

# The libraries a worker or a router imports before main(); importing a model family's config
# class is what pulls in transformers' model-loading stack.
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "transformers.models.llama.configuration_llama",
    "transformers.models.auto.tokenization_auto",
    "tokenizers",
    "safetensors.torch",
    "aiohttp.web",
    "uvloop",
    "zmq",
    "redis",
    "prometheus_client",
)
CONTROL_FD = 3


def preload() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:  # an optional library missing: the child imports what it needs itself
            pass


def serve(sock: socket.socket) -> dict | None:
    """Forks on each request; returns the request in a child, None when the client is gone."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    while True:
        try:
            ready, _, _ = select.select([sock, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap(sock)
        if sock not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        if not data:
            return None
        request = msgpack.unpackb(data)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            for fd in (*fds, wake_r, wake_w):
                os.close(fd)
            sock.close()
            return request
        for fd in fds:
            os.close(fd)
        sock.send(msgpack.packb({"pid": pid}))


def reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            sock.send(msgpack.packb({"exited": pid, "code": os.waitstatus_to_exitcode(status)}))
        except OSError:  # the client is gone
            return


def run_child(request: dict) -> None:
    """Becomes `python -m module args...`: sys.argv, the environment and cwd of the request."""
    import runpy

    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]  # ["-m", module, *args]
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def main() -> None:
    preload()
    sock = socket.socket(fileno=CONTROL_FD)
    request = serve(sock)
    if request is None:
        return
    run_child(request)  # in the forked child; its SystemExit ends this interpreter as python -m would


if __name__ == "__main__":
    main()
