"""Weight updates on fp8 workers (`--quantization fp8`), through a real router as a client sends them.

A is a tiny random Llama in float32, B a perturbed copy, B8 B exported as a per-tensor fp8
checkpoint. Expected tokens come from fp8 engines loaded from scratch in the test process (float32
activations, greedy). Each update must leave the worker serving exactly what a fresh fp8 model of
the new weights serves:
- TP=1: `/update_weights_from_disk` A → B (16-bit, re-quantized into weights + scales) → B8 (fp8,
  copied with its scales); `/get_weights_by_name` reads the stored e4m3 values and their scales;
  `/update_weights_from_tensor` with B's float32 tensors quantizes them as a fresh load does; what
  cannot work is a 400 that changes nothing (fp8 values without their scale, fp8 values for a
  16-bit parameter, a block-wise fp8 checkpoint).
- TP=2: the disk updates reach both ranks (each quantizes or cuts its own slice) and give the TP=1
  fp8 model's tokens (test_tensor_parallel_fp8.py: TP=2 equals TP=1 on fp8); so do tensor updates
  (one entry per rank, whole tensors: B's float32 ones quantized per row, B8's fp8 ones with their
  scales), read back whole from both ranks; fp8 values without their scale are a 400.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from pdserve.kernels.fp8_quant import per_channel_quant_fp8
from tests.helpers.checkpoint_copies import perturbed_copy
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.engine_tokens import tp1_greedy_tokens
from tests.helpers.fp8_checkpoint import COMPRESSED_TENSORS_PER_TENSOR, fp8_checkpoint
from tests.helpers.router_http import served_output_ids
from tests.helpers.sglang_control import serialize_named_tensors

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

FLAGS = ["--dtype", "float32", "--device", "cpu", "--quantization", "fp8", "--max-total-tokens", "2048",
         "--log-level", "warning"]  # fmt: skip
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11] * 23]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
K_PROJ = "model.layers.0.self_attn.k_proj.weight"  # rows 32..63 of the fp8 qkv_proj


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8-updates")
    a = Path(tiny_llama_dir)
    b = perturbed_copy(a, root / "b", seed=7)
    b8 = fp8_checkpoint(b, root / "b8", per_tensor=True, quantization_config=COMPRESSED_TENSORS_PER_TENSOR)
    block = root / "blockwise"
    shutil.copytree(b8, block)
    config = json.loads((block / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (block / "config.json").write_text(json.dumps(config))
    return {"a": a, "b": b, "b8": b8, "blockwise": block}


@pytest.fixture(scope="module")
def expected(checkpoints) -> dict[str, list[list[int]]]:
    """Tokens of each checkpoint's fp8 model loaded from scratch (TP=1)."""
    return {name: tp1_greedy_tokens(checkpoints[name], PROMPTS, GREEDY, "fp8") for name in ("a", "b", "b8")}


def _post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120)


def _from_disk(url: str, path: Path) -> requests.Response:
    return _post(url, "/update_weights_from_disk", {"model_path": str(path)})


def _from_tensors(url: str, named: list[tuple[str, torch.Tensor]], ranks: int = 1) -> requests.Response:
    entries = [serialize_named_tensors(named)] * ranks  # SGLang: one entry per tensor-parallel rank
    return _post(url, "/update_weights_from_tensor", {"serialized_named_tensors": entries})


def _weights(url: str, name: str, truncate_size: int = 100) -> torch.Tensor:
    resp = _post(url, "/get_weights_by_name", {"name": name, "truncate_size": truncate_size})
    assert resp.status_code == 200, resp.text
    return torch.tensor(resp.json())


def _refused(resp: requests.Response, words: str) -> None:
    """SGLang's answer to a failed update: 400, success false, a message that says why."""
    assert resp.status_code == 400, resp.text
    assert resp.json()["success"] is False and words in resp.json()["message"], resp.text


def _start(worker_launcher, router_launcher, model_dir: Path, *flags: str) -> str:
    worker = worker_launcher("--model-path", str(model_dir), *FLAGS, *flags)
    url = router_launcher("--worker-addr", worker.zmq_address).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")
    return url


def test_an_fp8_worker_updates_from_disk_and_from_tensors(
    worker_launcher, router_launcher, checkpoints, expected
):
    assert len({str(t) for t in expected.values()}) == 3  # three different models
    url = _start(worker_launcher, router_launcher, checkpoints["a"])
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["a"]

    resp = _from_disk(url, checkpoints["b"])  # 16-bit: quantized into the fp8 weights and scales
    assert resp.status_code == 200 and resp.json()["message"] == "Succeeded to update model weights.", (
        resp.text
    )
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b"]
    resp = _from_disk(url, checkpoints["b8"])  # fp8 per tensor: copied with its scales
    assert resp.status_code == 200, resp.text
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b8"]

    # the stored parameter, as SGLang answers: e4m3 values without the scale, and the scales apart
    b8 = load_file(str(checkpoints["b8"] / "model.safetensors"))
    assert torch.equal(_weights(url, K_PROJ, 2), b8[K_PROJ][:2].float())
    assert torch.equal(_weights(url, K_PROJ + "_scale"), b8[K_PROJ + "_scale"].expand(32))

    refusals = [
        (_from_disk(url, checkpoints["blockwise"]), "block-wise"),
        (_from_tensors(url, [(K_PROJ, b8[K_PROJ])]), f"{K_PROJ}_scale is not given"),
        (_from_tensors(url, [("model.norm.weight", torch.zeros(64, dtype=torch.float8_e4m3fn))]), "no scale"),
        (_from_tensors(url, [(K_PROJ + "_scale", torch.ones(3))]), "one per row"),
    ]
    for resp, words in refusals:
        _refused(resp, words)
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b8"]

    # B's float32 tensors: each fp8 linear's rows quantized here, as a fresh load of B does
    b = load_file(str(checkpoints["b"] / "model.safetensors"))
    resp = _from_tensors(url, sorted(b.items()))
    assert resp.status_code == 200, resp.text
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b"]
    weight, scale = per_channel_quant_fp8(b[K_PROJ])
    assert torch.equal(_weights(url, K_PROJ, 4), weight[:4].float())
    assert torch.equal(_weights(url, K_PROJ + "_scale"), scale)


def test_a_tp2_fp8_worker_updates_every_rank_from_disk(
    worker_launcher, router_launcher, checkpoints, expected
):
    url = _start(worker_launcher, router_launcher, checkpoints["a"], "--tp", "2")
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["a"]
    for name in ("b", "b8"):
        resp = _from_disk(url, checkpoints[name])
        assert resp.status_code == 200, resp.text
        assert served_output_ids(url, PROMPTS, GREEDY) == expected[name]
    _refused(_from_disk(url, checkpoints["blockwise"]), "block-wise")
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b8"]

    b = load_file(str(checkpoints["b"] / "model.safetensors"))
    resp = _from_tensors(url, sorted(b.items()), ranks=2)
    assert resp.status_code == 200, resp.text
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b"]
    weight, scale = per_channel_quant_fp8(b[K_PROJ])  # one KV head (16 rows) on each rank
    assert torch.equal(_weights(url, K_PROJ), weight.float())
    assert torch.equal(_weights(url, K_PROJ + "_scale"), scale)
    b8 = load_file(str(checkpoints["b8"] / "model.safetensors"))
    _refused(_from_tensors(url, [(K_PROJ, b8[K_PROJ])], ranks=2), f"{K_PROJ}_scale is not given")
    b8_weights = sorted((n, t) for n, t in b8.items() if not n.endswith(".input_scale"))  # refused as at TP=1
    resp = _from_tensors(url, b8_weights, ranks=2)
    assert resp.status_code == 200, resp.text
    assert torch.equal(_weights(url, K_PROJ), b8[K_PROJ].float())
    assert served_output_ids(url, PROMPTS, GREEDY) == expected["b8"]
