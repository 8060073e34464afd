"""The stack the native-API router tests drive: one `worker` (tiny random Llama, CPU, float32) and one
`router` on it with --api-key/--admin-api-key, round robin, --max-batch-size 70, --max-body-bytes
200000 and --preferred-sampling-params, plus a native stream run in a thread.

Import the fixtures into a test module (`from tests.helpers.router_native_stack import tiny, tiny_model,
tiny_worker`): they are module-scoped, so each module that imports them starts its own worker and router.

    thread = stream_in_background(url, {"input_ids": [1, 2], "sampling_params": {...}}, result)
    thread.join(60)  # result: {"status": 200, "chunks": [...]}
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import requests

from tests.helpers.router_http import ADMIN_KEY, API_KEY, AUTH, sse_chunks
from tests.helpers.tiny_models import make_tiny_model

TINY_FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PREFERRED = {"max_new_tokens": 5}
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def tiny_worker(worker_launcher, tiny_model) -> str:
    return worker_launcher("--model-path", tiny_model, *TINY_FLAGS).zmq_address


@pytest.fixture(scope="module")
def tiny(router_launcher, tiny_worker) -> str:
    router = router_launcher(
        "--worker-addr", tiny_worker, "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY,
        "--policy", "round_robin", "--max-batch-size", "70", "--max-body-bytes", "200000",
        "--preferred-sampling-params", json.dumps(PREFERRED),
    )  # fmt: skip
    return router.url


def stream_in_background(url: str, body: dict, result: dict) -> threading.Thread:
    def run() -> None:
        resp = requests.post(url + "/generate", json={**body, "stream": True}, headers=AUTH, timeout=120)
        result["status"] = resp.status_code
        result["chunks"] = sse_chunks(resp)

    thread = threading.Thread(target=run)
    thread.start()
    return thread
