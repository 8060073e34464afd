"""`/update_weights_from_disk` on a `worker --tp 2` (gloo, CPU) behind a real router.

A is a tiny random Llama, B a perturbed copy. Expected tokens come from TP=1 engines in the test
process (float32, greedy). Checked through the router, as a client sees it:
- A → B: 200 "Succeeded to update model weights.", then greedy output is B's TP=1 output;
- a checkpoint with a tensor of another shape: 400 naming the tensor, output stays B's;
- `/update_weights_from_tensor`: 400 saying it does not reach the other ranks, output stays B's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.helpers.checkpoint_copies import misshapen_copy, perturbed_copy
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.engine_tokens import tp1_greedy_tokens
from tests.helpers.router_http import served_output_ids

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "2048", "--log-level", "warning"]
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11] * 23]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}


def test_a_tp2_worker_reloads_every_rank_from_disk(
    worker_launcher, router_launcher, tiny_llama_dir, tmp_path
):
    a = Path(tiny_llama_dir)
    b = perturbed_copy(a, tmp_path / "b", seed=7)
    misshapen = misshapen_copy(a, tmp_path / "misshapen", "model.layers.1.mlp.up_proj.weight")
    on_a, on_b = tp1_greedy_tokens(a, PROMPTS, GREEDY), tp1_greedy_tokens(b, PROMPTS, GREEDY)
    assert on_a != on_b
    worker = worker_launcher("--model-path", str(a), "--tp", "2", *FLAGS)
    url = router_launcher("--worker-addr", worker.zmq_address).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")
    assert served_output_ids(url, PROMPTS, GREEDY) == on_a

    resp = requests.post(url + "/update_weights_from_disk", json={"model_path": str(b)}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["message"] == "Succeeded to update model weights."
    assert served_output_ids(url, PROMPTS, GREEDY) == on_b

    resp = requests.post(url + "/update_weights_from_disk", json={"model_path": str(misshapen)}, timeout=120)
    assert resp.status_code == 400, resp.text
    assert "model.layers.1.mlp.up_proj.weight" in resp.json()["message"]
    assert served_output_ids(url, PROMPTS, GREEDY) == on_b

    resp = requests.post(
        url + "/update_weights_from_tensor", json={"serialized_named_tensors": ["x"]}, timeout=60
    )
    assert resp.status_code == 400, resp.text
    assert "tensor-parallel ranks" in resp.json()["message"]
    assert served_output_ids(url, PROMPTS, GREEDY) == on_b
