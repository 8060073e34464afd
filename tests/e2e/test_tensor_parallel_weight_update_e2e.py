"""`/update_weights_from_disk` on a `worker --tp 2` (gloo, CPU) behind a real router.

A is a tiny random Llama, B a perturbed copy. Expected tokens come from TP=1 engines in the test
process (float32, greedy). Checked through the router, as a client sees it:
- A → B: 200 "Succeeded to update model weights.", then greedy output is B's TP=1 output;
- a checkpoint with a tensor of another shape: 400 naming the tensor, output stays B's;
- `/update_weights_from_tensor` with A's whole tensors, one entry per rank (SGLang's contract),
  B → A: 200 "Success", then greedy output is A's TP=1 output;
- `/get_weights_by_name` of sharded parameters (column- and row-parallel, vocabulary rows, KV
  heads) and a replicated one: the whole checkpoint tensor's rows, gathered from both ranks;
- a misshapen tensor: 400 naming it; an entry that fits rank 0 but not rank 1: 400 naming rank 1,
  and rank 0 did not copy it either (read back: still A's); one entry for two ranks: 400;
- "direct" (the model's own names, each rank its slice): B's down_proj slices, read back whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from tests.helpers.checkpoint_copies import misshapen_copy, perturbed_copy
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.engine_tokens import tp1_greedy_tokens
from tests.helpers.router_http import served_output_ids
from tests.helpers.sglang_control import serialize_named_tensors

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "2048", "--log-level", "warning"]
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11] * 23]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
EMBED, DOWN = "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"
READ_BACK = (  # rows by heads (q; k and v: one KV head a rank), columns (o, down), vocabulary, none
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    DOWN,
    EMBED,
    "lm_head.weight",
    "model.norm.weight",
)


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

    a_tensors, b_tensors = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    resp = _from_tensors(url, [sorted(a_tensors.items())] * 2)
    assert resp.status_code == 200 and resp.json()["message"] == "Success", resp.text
    assert served_output_ids(url, PROMPTS, GREEDY) == on_a
    for name in READ_BACK:
        assert torch.equal(_weights(url, name), a_tensors[name]), name
    assert torch.equal(_weights(url, EMBED, 3), a_tensors[EMBED][:3])  # truncated: the first rows

    _refused(_from_tensors(url, [[(DOWN, torch.zeros(64, 130))]] * 2), DOWN)
    half_bad = [[(DOWN, b_tensors[DOWN])], [(DOWN, torch.zeros(3))]]
    _refused(_from_tensors(url, half_bad), "tensor-parallel rank 1")
    assert torch.equal(_weights(url, DOWN), a_tensors[DOWN])  # rank 0 did not copy its fitting one
    _refused(_from_tensors(url, [[(DOWN, b_tensors[DOWN])]]), "one entry per tensor-parallel rank")
    assert served_output_ids(url, PROMPTS, GREEDY) == on_a

    direct = [[(DOWN, b_tensors[DOWN][:, r * 64 : (r + 1) * 64].contiguous())] for r in range(2)]
    resp = _from_tensors(url, direct, load_format="direct")
    assert resp.status_code == 200, resp.text
    assert torch.equal(_weights(url, DOWN), b_tensors[DOWN])


def _from_tensors(url: str, entries: list[list], **body) -> requests.Response:
    payload = [serialize_named_tensors(named) for named in entries]
    return requests.post(
        url + "/update_weights_from_tensor", json={"serialized_named_tensors": payload, **body}, timeout=120
    )


def _weights(url: str, name: str, truncate_size: int = 100_000) -> torch.Tensor:
    resp = requests.post(url + "/get_weights_by_name", json={"name": name, "truncate_size": truncate_size})
    assert resp.status_code == 200, resp.text
    return torch.tensor(resp.json())


def _refused(resp: requests.Response, words: str) -> None:
    assert resp.status_code == 400, resp.text
    assert resp.json()["success"] is False and words in resp.json()["message"], resp.text
