"""`worker --tp 2` on the CPU (gloo): real processes behind a real router.

- A TP=2 worker serves transformers' greedy tokens (logprobs within 1e-5) through the router.
- A follower rank killed mid-stream takes the worker down (exit status 1, within seconds); the
  router sees it leave; the client's stream ends instead of hanging.
- An architecture the sharding pass does not cover exits 1 at start-up, naming it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading

import psutil
import pytest
import requests

from pdserve.shared.launch.worker_process import WorkerProcess
from tests.helpers.cluster_waits import all_pages_back, live_workers, wait_until
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.router_http import greedy_generate
from tests.helpers.tiny_classifiers import make_tiny_classifier

pytestmark = pytest.mark.slow

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
MAX_NEW = 8
LOGPROB_TOL = 1e-5


def test_a_tp2_worker_serves_transformers_greedy_tokens(worker_launcher, router_launcher, tiny_llama_dir):
    worker = worker_launcher("--model-path", tiny_llama_dir, "--tp", "2", *FLAGS)
    assert len(psutil.Process(worker.pid).children()) == 1  # rank 1
    url = router_launcher("--worker-addr", worker.zmq_address).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (4, 30)]
    for prompt, (want_ids, want_lps) in zip(prompts, hf_greedy(tiny_llama_dir, prompts, MAX_NEW)):
        got_ids, got_lps = greedy_generate(url, prompt, MAX_NEW)
        assert got_ids == want_ids
        assert got_lps == pytest.approx(want_lps, abs=LOGPROB_TOL)
    info = requests.get(url + "/get_server_info", timeout=10).json()
    assert '"tp_size": 2' in json.dumps(info)
    wait_until(lambda: all_pages_back(url), 10.0, "the pages")


def test_a_killed_rank_takes_the_worker_down(worker_launcher, router_launcher, tiny_llama_dir):
    worker = worker_launcher("--model-path", tiny_llama_dir, "--tp", "2", *FLAGS)
    (follower,) = (p.pid for p in psutil.Process(worker.pid).children())
    url = router_launcher("--worker-addr", worker.zmq_address).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")
    first_token, stream_ended = threading.Event(), threading.Event()

    def stream() -> None:
        body = {
            "text": "a long answer",
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True},
            "stream": True,
        }
        try:
            with requests.post(url + "/generate", json=body, stream=True, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith(b"data: {"):
                        first_token.set()
        except requests.RequestException:
            pass  # a dropped connection ends the stream as well
        stream_ended.set()

    threading.Thread(target=stream, daemon=True).start()
    assert first_token.wait(30), "no token streamed"
    os.kill(follower, signal.SIGKILL)
    assert worker.proc.wait(15) == 1
    wait_until(lambda: not live_workers(url), 10.0, "the router to see the worker leave")
    assert stream_ended.wait(60), "the client's stream hangs"


def test_an_architecture_without_tensor_parallelism_is_refused_by_name(tmp_path):
    model_dir = make_tiny_classifier("llama", tmp_path / "reward")
    flags = ["--port", "0", "--model-path", str(model_dir), "--tp", "2", *FLAGS]
    with WorkerProcess(flags, stderr=subprocess.PIPE) as worker:
        with pytest.raises(RuntimeError, match="status 1"):
            worker.wait_ready(60)
        assert worker.proc.stderr is not None
        assert "LlamaForSequenceClassification has no tensor-parallel support" in worker.proc.stderr.read()
