"""`router --processes 2` in front of one tiny-Llama worker: one port, two real router processes.

In order: many concurrent requests on fresh connections are each answered (their own rid, prompt
length and token count) and both processes served some; /metrics, whichever process answers it,
counts every request; `/abort_request` sent to the process that does not run a stream aborts it
(the siblings' control sockets); SIGTERM to the parent exits 0 and leaves no router process.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

WORKER_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning",
]  # fmt: skip
REQUESTS = 24


@pytest.fixture(scope="module")
def router(router_launcher, worker_launcher, tiny_llama_dir):
    worker = worker_launcher("--model-path", tiny_llama_dir, *WORKER_FLAGS)
    proc = router_launcher("--worker-addr", worker.zmq_address, "--processes", "2", "--log-level", "warning")
    deadline = time.monotonic() + 30
    while not all(requests.get(proc.url + "/health").status_code == 200 for _ in range(8)):
        assert time.monotonic() < deadline, "not every process became healthy"  # fresh connections
        time.sleep(0.1)
    return proc


def _generate(url: str, i: int) -> dict:
    body = {
        "rid": f"req-{i}",
        "input_ids": list(range(3, 4 + i)),  # a prompt length per request: answers cannot be swapped
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True},
    }
    resp = requests.post(url + "/generate", json=body, timeout=60)  # no session: a fresh connection
    assert resp.status_code == 200, resp.text
    return resp.json()


def _process_index(session: requests.Session, url: str) -> int:
    return session.get(url + "/get_server_info", timeout=10).json()["router_process_index"]


def _generate_count(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pdserve_router_requests_total" and s.labels == {"route": "/generate", "code": "200"}
    )


def test_one_port_many_requests_both_processes_and_summed_metrics(router):
    url = router.url
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _generate(url, i), range(REQUESTS)))
    for i, out in enumerate(answers):
        meta = out["meta_info"]
        assert meta["id"] == f"req-{i}"
        assert meta["prompt_tokens"] == i + 1
        assert meta["completion_tokens"] == 6 and len(out["output_ids"]) == 6
        assert meta["finish_reason"]["type"] == "length"

    seen = {_process_index(requests.Session(), url) for _ in range(40)}
    assert seen == {0, 1}
    info = requests.get(url + "/get_server_info", timeout=10).json()
    assert info["router_processes"] == 2 and info["processes"] == 2

    # every scrape, whichever process answers it, counts the requests of both
    assert [_generate_count(url) for _ in range(6)] == [REQUESTS] * 6


def test_abort_reaches_the_process_running_the_stream(router):
    url = router.url
    rid = "long-stream"
    body = {
        "rid": rid,
        "input_ids": [5, 6, 7],
        "stream": True,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True},
    }
    last: dict = {}

    def stream() -> None:
        with requests.post(url + "/generate", json=body, stream=True, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    last.update(json.loads(line[6:]))

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 20
    owner = None
    while owner is None:  # the process whose requests on the worker include the stream
        assert time.monotonic() < deadline, "the stream never showed as running"
        s = requests.Session()
        info = s.get(url + "/get_server_info", timeout=10).json()
        if info["workers"][0]["router_inflight"] == 1:
            owner = info["router_process_index"]
    while True:  # a connection that reaches the other process: it must pass the abort on
        s = requests.Session()
        if _process_index(s, url) != owner:
            break
    assert s.post(url + "/abort_request", json={"rid": rid}, timeout=10).status_code == 200
    thread.join(30)
    assert not thread.is_alive()
    meta = last["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 900


def test_sigterm_stops_every_process_and_exits_zero(router):
    parent = router.proc.pid
    children = [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    assert len(children) == 2
    assert router.stop(signal.SIGTERM, timeout_s=30) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
