"""The stack the SGLang control-route tests drive: two real tiny-Llama workers behind one router
(round robin, an admin key), and how those tests call it.

Import the fixtures into a test module (`from tests.helpers.sglang_routes_stack import model_dir, router,
workers`): they are module-scoped, so each module that imports them starts its own workers and router.

    admin(router, "/pause_generation", {"mode": "in_place"})  # a request with the admin key
    generate(router)["output_ids"]  # PROMPT, greedy, 8 tokens
    on_both(router)  # the same, once on each worker
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.helpers.tiny_models import make_tiny_model

ADMIN_KEY = "sglang-routes-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PROMPT = [(5 * i + 11) % 250 + 3 for i in range(12)]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("sglang-routes"))))


@pytest.fixture(scope="module")
def workers(worker_launcher, model_dir) -> list[str]:
    return [worker_launcher("--model-path", model_dir, *FLAGS).zmq_address for _ in range(2)]


@pytest.fixture(scope="module")
def router(router_launcher, workers) -> str:
    flags = ["--policy", "round_robin", "--admin-api-key", ADMIN_KEY]
    return router_launcher(*[f for w in workers for f in ("--worker-addr", w)], *flags).url


def admin(url: str, path: str, body=None, method: str = "POST") -> requests.Response:
    return requests.request(method, url + path, json=body, headers=ADMIN, timeout=120)


def generate(url: str, params: dict = GREEDY, prompt: list[int] = PROMPT, **kw) -> dict:
    resp = requests.post(
        url + "/generate", json={"input_ids": prompt, "sampling_params": params, **kw}, timeout=300
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def on_both(url: str) -> list[list[int]]:
    """The prompt's greedy output once on each worker (round robin over two)."""
    return [generate(url)["output_ids"] for _ in range(2)]
