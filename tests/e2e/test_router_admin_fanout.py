"""Admin routes that fan out to every worker, checked on each worker's own state afterwards.

Three real workers: two tiny-Llama workers on checkpoint A (W1, W2) and one tiny Qwen2 worker (W3,
another architecture). Router R serves W1 + W2 (round robin, an admin key); router R2 serves W1 +
W3, where a weights update can only succeed on W1. In order:
1. `/flush_cache` (GET with `?timeout=`, POST without) empties the radix cache of BOTH workers:
   each worker's evictable pages drop to 0 (/get_load per worker) and a repeated prompt has no
   cached tokens on either;
2. a flush while one worker runs a request: 400 naming that worker only (the idle one is flushed),
   then `?timeout=` waits for it and answers 200;
3. `/update_weights_from_disk` A → B (a perturbed copy) reaches both workers: each worker's
   weight_version in /get_server_info, and both give B's greedy output; `/update_weights` (the
   seeds' alias) brings both back to A;
4. a partial update (R2: W1 takes it, W3 refuses another architecture) is a 400 whose message is
   W3's own words and "(1 of 2 workers updated)"; W1's version moved, W3's did not.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

ADMIN_KEY = "fanout-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "2048", "--log-level", "warning"]
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(40)]  # 40 tokens: two full pages get cached
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = Path(tmp_path_factory.mktemp("fanout-weights"))
    a = make_tiny_model("llama", root / "a")
    b = root / "b"  # A's names and shapes, other values
    shutil.copytree(a, b)
    tensors = load_file(str(a / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    qwen = make_tiny_model("qwen2", root / "qwen2")
    return {"a": str(a), "b": str(b), "qwen2": str(qwen)}


@pytest.fixture(scope="module")
def workers(worker_launcher, checkpoints) -> dict[str, str]:
    """name -> the worker's ZMQ address, which is also its worker_id at a --worker-addr router."""
    return {
        "w1": worker_launcher("--model-path", checkpoints["a"], *FLAGS).zmq_address,
        "w2": worker_launcher("--model-path", checkpoints["a"], *FLAGS).zmq_address,
        "w3": worker_launcher("--model-path", checkpoints["qwen2"], *FLAGS).zmq_address,
    }


@pytest.fixture(scope="module")
def router(router_launcher, workers) -> str:
    return router_launcher(
        "--worker-addr", workers["w1"], "--worker-addr", workers["w2"], "--policy", "round_robin",
        "--admin-api-key", ADMIN_KEY,
    ).url  # fmt: skip


def loads(url: str) -> dict[str, dict]:
    return {row["worker_id"]: row for row in requests.get(url + "/get_load", timeout=10).json()}


def generate(url: str, input_ids: list[int], params: dict = GREEDY) -> dict:
    resp = requests.post(
        url + "/generate", json={"input_ids": input_ids, "sampling_params": params}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def on_both(url: str, input_ids: list[int]) -> list[dict]:
    """The prompt once on each worker of R (round robin over two workers: two requests in a row)."""
    return [generate(url, input_ids) for _ in range(2)]


def worker_versions(url: str) -> dict[str, str]:
    info = requests.get(url + "/get_server_info", timeout=10).json()
    return {w["worker_id"]: w["weight_version"] for w in info["workers"]}


def assert_cached_on_both(url: str, workers: dict[str, str]) -> None:
    rows = loads(url)
    for name in ("w1", "w2"):
        assert rows[workers[name]]["num_evictable_pages"] > 0, rows


def assert_flushed_on_both(url: str, workers: dict[str, str]) -> None:
    rows = loads(url)
    for name in ("w1", "w2"):
        row = rows[workers[name]]
        assert row["num_evictable_pages"] == 0 and row["num_free_pages"] == row["num_total_pages"], row


# ---------------------------------------------------------------------- 1-2. flush_cache


def test_flush_cache_get_and_post_empty_every_workers_cache(router, workers):
    on_both(router, PROMPT)
    assert [o["meta_info"]["cached_tokens"] for o in on_both(router, PROMPT)] == [32, 32]  # 2 pages each
    assert_cached_on_both(router, workers)

    resp = requests.get(router + "/flush_cache?timeout=5", headers=ADMIN)
    assert resp.status_code == 200 and resp.text == "Cache flushed.\n"
    assert_flushed_on_both(router, workers)
    assert [o["meta_info"]["cached_tokens"] for o in on_both(router, PROMPT)] == [0, 0]

    assert_cached_on_both(router, workers)
    resp = requests.post(router + "/flush_cache", headers=ADMIN)
    assert resp.status_code == 200 and resp.text == "Cache flushed.\n"
    assert_flushed_on_both(router, workers)
    assert [o["meta_info"]["cached_tokens"] for o in on_both(router, PROMPT)] == [0, 0]


def test_flush_while_one_worker_runs_names_that_worker_then_timeout_waits(router, workers):
    on_both(router, PROMPT)
    assert_cached_on_both(router, workers)
    result: dict = {}
    long_params = {"temperature": 0.0, "max_new_tokens": 600, "ignore_eos": True}

    def run() -> None:
        result["resp"] = requests.post(
            router + "/generate", json={"input_ids": [1, 2, 3], "sampling_params": long_params}, timeout=120
        )

    thread = threading.Thread(target=run)
    thread.start()
    for _ in range(400):
        busy = [wid for wid, row in loads(router).items() if row["num_running_reqs"]]
        if busy:
            break
    (busy_id,) = busy
    (idle_id,) = {workers["w1"], workers["w2"]} - {busy_id}

    refused = requests.post(router + "/flush_cache", headers=ADMIN)
    assert refused.status_code == 400, refused.text
    message = refused.json()["message"]
    assert message.startswith(f"Cache not flushed ({busy_id}: ") and "running" in message, message
    assert idle_id not in message and message.endswith(
        "Pass ?timeout=<seconds> to wait for running requests to finish."
    )
    idle = loads(router)[idle_id]
    assert idle["num_evictable_pages"] == 0  # the idle worker flushed all the same

    waited = requests.get(router + "/flush_cache?timeout=60", headers=ADMIN)
    assert waited.status_code == 200 and waited.text == "Cache flushed.\n"
    thread.join(60)
    assert result["resp"].status_code == 200
    assert result["resp"].json()["meta_info"]["completion_tokens"] == 600
    assert_flushed_on_both(router, workers)


# ---------------------------------------------------------------------- 3-4. weights


def test_update_weights_reaches_every_worker_and_the_alias_does_too(router, workers, checkpoints):
    on_a = [o["output_ids"] for o in on_both(router, PROMPT)]
    assert on_a[0] == on_a[1]

    resp = requests.post(
        router + "/update_weights_from_disk",
        json={"model_path": checkpoints["b"], "weight_version": "b1"},
        headers=ADMIN,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "success": True,
        "message": "Succeeded to update model weights.",
        "num_paused_requests": 0,
    }
    assert worker_versions(router) == {workers["w1"]: "b1", workers["w2"]: "b1"}
    info = requests.get(router + "/get_model_info").json()
    assert (info["weight_version"], info["model_path"]) == ("b1", checkpoints["b"])
    outs = on_both(router, PROMPT)
    on_b = [o["output_ids"] for o in outs]
    assert on_b[0] == on_b[1] != on_a[0]  # both workers serve B (one left on A would differ)
    assert [o["meta_info"]["weight_version"] for o in outs] == ["b1", "b1"]
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 0]  # an update flushes the cache

    # the seeds' name of the route: same handler, same admin key
    denied = requests.post(router + "/update_weights", json={"model_path": checkpoints["a"]})
    assert denied.status_code == 401 and "admin API key" in denied.json()["message"]
    assert worker_versions(router) == {workers["w1"]: "b1", workers["w2"]: "b1"}
    resp = requests.post(
        router + "/update_weights",
        json={"model_path": checkpoints["a"], "weight_version": "a2"},
        headers=ADMIN,
    )
    assert resp.status_code == 200 and resp.json()["message"] == "Succeeded to update model weights."
    assert worker_versions(router) == {workers["w1"]: "a2", workers["w2"]: "a2"}
    assert [o["output_ids"] for o in on_both(router, PROMPT)] == on_a


def test_partial_update_names_the_refusing_worker_and_counts_the_updated(
    router_launcher, router, workers, checkpoints
):
    mixed = router_launcher("--worker-addr", workers["w1"], "--worker-addr", workers["w3"]).url
    on_a = generate(router, PROMPT)["output_ids"]
    before = worker_versions(mixed)
    router_before = requests.get(mixed + "/get_model_info").json()
    resp = requests.post(
        mixed + "/update_weights_from_disk", json={"model_path": checkpoints["b"], "weight_version": "p1"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json() == {
        "success": False,
        "message": (
            f"Failed to update weights: {checkpoints['b']} is a ['LlamaForCausalLM'] model, "
            "the served model is ['Qwen2ForCausalLM']. (1 of 2 workers updated)"
        ),
        "num_paused_requests": 0,
    }
    assert worker_versions(mixed) == {workers["w1"]: "p1", workers["w3"]: before[workers["w3"]]}
    info = requests.get(mixed + "/get_model_info").json()  # not a success: the router's facts stay
    assert (info["weight_version"], info["model_path"]) == (
        router_before["weight_version"],
        router_before["model_path"],
    )
    # W1 serves B now, W2 (not behind R2) still A: R's two workers disagree
    outs = sorted(o["output_ids"] for o in on_both(router, PROMPT))
    assert on_a in outs and outs[0] != outs[1]
