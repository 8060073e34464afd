"""SGLang-style logs from real processes (a real Redis, a router, a mixed worker on a tiny random
Llama, CPU), in the order they happen:

1. a router started with `--ready-when-serving` before any worker says what it waits for and prints
   no ready line; once a worker registers it prints it, /health is 200 at that moment, and it logs
   SGLang's "The server is fired up and ready to roll!";
2. the worker (`--decode-log-interval 3`) logs a `Prefill batch.` line per prefill batch with
   SGLang's fields (the cached tokens of a repeated prompt included) and a `Decode batch.` line
   every 3 decode steps;
3. the router (`--log-requests`) logs one `Finish:` line per request: rid, token counts, latency,
   finish reason, and an abort for a client that went away mid-stream.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from pdserve.shared.launch.worker_process import WorkerProcess, http_status
from tests.e2e.conftest import RouterProcess

pytestmark = pytest.mark.slow

WORKER_FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--page-size", "16"]
PROMPT = list(range(30, 50))  # 20 tokens
PARAMS = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
PREFILL = re.compile(
    r"Prefill batch\. #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+), token usage: (\d\.\d\d), "
    r"#running-req: (\d+), #queue-req: (\d+), $"
)
DECODE = re.compile(
    r"Decode batch\. #running-req: (\d+), #token: (\d+), token usage: (\d\.\d\d), cpu graph: (True|False), "
    r"gen throughput \(token/s\): (\d+\.\d\d), #queue-req: (\d+), $"
)


def finish_line(rid: str) -> re.Pattern:
    return re.compile(
        rf"Finish: rid={rid}, prompt_tokens=(\d+), completion_tokens=(\d+), cached_tokens=(\d+), "
        r"e2e_latency=(\d+\.\d+), finish_reason=(.*)$",
        re.MULTILINE,
    )


@dataclass
class Cluster:
    router: RouterProcess
    worker: WorkerProcess
    router_log: Path
    worker_log: Path
    ready_line_before_a_worker: bool
    health_at_ready_line: int | None


def wait_for_text(path: Path, text: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {path.name}:\n{path.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_url, tiny_llama_dir):
    logs = tmp_path_factory.mktemp("sglang-logs")
    router_log, worker_log = logs / "router.log", logs / "worker.log"
    with open(router_log, "w") as rlog, open(worker_log, "w") as wlog:
        router = RouterProcess(
            ["--redis-url", redis_url, "--ready-when-serving", "--log-requests", "--log-level", "info"],
            stderr=rlog,
        )
        worker = None
        try:
            wait_for_text(router_log, "not serving yet")  # it runs and listens, with no worker
            try:
                router.wait_ready(1.0, healthy=False)
                early = True
            except TimeoutError:
                early = False
            worker = WorkerProcess(
                ["--port", "0", "--model-path", tiny_llama_dir, *WORKER_FLAGS, "--redis-url", redis_url]
                + ["--decode-log-interval", "3", "--log-level", "info"],
                stderr=wlog,
            )
            worker.wait_ready(90)
            router.wait_ready(60, healthy=False)
            health = http_status(router.url + "/health")
            yield Cluster(router, worker, router_log, worker_log, early, health)
        finally:
            router.stop()
            if worker is not None:
                worker.stop()


def generate(url: str, rid: str, ids: list[int], stream: bool = False) -> requests.Response:
    body = {"rid": rid, "input_ids": ids, "sampling_params": PARAMS, "stream": stream}
    resp = requests.post(url + "/generate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def test_router_says_ready_only_once_it_can_serve(cluster):
    assert not cluster.ready_line_before_a_worker
    assert cluster.health_at_ready_line == 200
    text = cluster.router_log.read_text()
    assert re.search(r"listening on http://\S+, not serving yet: No worker", text), text[-2000:]
    assert "The server is fired up and ready to roll!" in text


def test_worker_logs_sglangs_batch_lines(cluster):
    generate(cluster.router.url, "log-a", PROMPT)
    generate(cluster.router.url, "log-b", [*PROMPT, 7, 8], stream=True)
    wait_for_text(cluster.worker_log, "#new-token: 6,")
    lines = cluster.worker_log.read_text().splitlines()
    prefills = [(i, m.groups()) for i, line in enumerate(lines) if (m := PREFILL.search(line))]
    (a_at, a), (b_at, b) = [(i, g) for i, g in prefills if g[1] in ("20", "6")]
    # 20 new tokens in 2 pages of 16, nothing cached yet, alone; then the repeated prompt's first
    # page comes from the cache (the rest of its 22 tokens, 6, is computed)
    assert (a[0], a[1], a[2], a[4], a[5]) == ("1", "20", "0", "0", "0")
    assert float(a[3]) == pytest.approx(32 / 4096, abs=0.005)
    assert (b[0], b[1], b[2]) == ("1", "6", "16")
    # log-a: 9 decode steps after its prefill (which sampled the first of 10 tokens): a line every 3
    decodes = [m.groups() for line in lines[a_at:b_at] if (m := DECODE.search(line))]
    assert len(decodes) == 3, lines[a_at:b_at]
    for running, tokens, usage, graph, throughput, queued in decodes:
        assert (running, tokens, graph, queued) == ("1", "32", "False", "0")
        assert float(throughput) >= 0.0
    assert float(decodes[-1][4]) > 0.0


def test_router_logs_a_finish_line_per_request(cluster):
    url = cluster.router.url
    generate(url, "log-c", PROMPT)
    generate(url, "log-d", PROMPT, stream=True)
    # a client that goes away after the first chunk of a long stream
    body = {"rid": "log-gone", "input_ids": [5, 6, 7], "stream": True}
    body["sampling_params"] = {**PARAMS, "max_new_tokens": 1000}  # the context is 1024
    with requests.post(url + "/generate", json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert json.loads(first.decode()[len("data: ") :])["meta_info"]["id"] == "log-gone"
    wait_for_text(cluster.router_log, "Finish: rid=log-gone")
    text = cluster.router_log.read_text()
    for rid in ("log-c", "log-d"):
        ((prompt, completion, cached, latency, reason),) = finish_line(rid).findall(text)
        assert (prompt, completion) == ("20", "10") and int(cached) in (0, 16)
        assert 0 < float(latency) < 60
        assert reason == "{'type': 'length', 'length': 10}"
    ((prompt, completion, _, _, reason),) = finish_line("log-gone").findall(text)
    assert prompt == "3" and int(completion) < 1000
    assert reason.startswith("{'type': 'abort'"), reason
