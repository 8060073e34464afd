"""`--quantization fp8` end to end on CPU: an engine with fp8 weights against the same model in
float32 with fake-quantized linears and MoE experts (tests/helpers/fp8_reference.py), then a real worker process
behind a real router serving the same tokens.

The bound: the fp8 GEMM and the reference multiply the same fp8 values and differ only in the order
of their float32 sums (~1e-6 relative). The next layer quantizes its input again, so an activation
sitting on an fp8 rounding boundary may round to its neighbour on one side only: one input of 64
moves by one fp8 step (1/16 of its value), which moved a logprob by 1.5e-3 in one run. Logprobs
agree to 1e-2, well inside fp8's own cost (tokens flip against float32, see bench/RESULTS.md), and
greedy tokens are identical. MoE experts requantize twice per expert (the layer's rows, then the
SiLU-and-mul rows) with the same boundary argument; their runs agree to ~1e-6. One intra-op thread, so the sums' order is the same on every machine.
"""

from __future__ import annotations

import random

import pytest
import requests
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.fp8_reference import fake_quantize_experts, fake_quantize_linears
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 23, 40)]


def _engine(model_dir: str, quantization: str | None) -> Engine:
    return Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", quantization=quantization))


def _assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["output_ids"] == w["output_ids"]
        for (lp_g, tok_g), (lp_w, tok_w) in zip(
            g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"], strict=True
        ):
            assert tok_g == tok_w and abs(lp_g - lp_w) < 1e-2


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_moe", "mixtral", "deepseek_v2"])
def test_fp8_engine_equals_the_fake_quantized_model(tmp_path, kind, one_thread):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    fp8 = _engine(model_dir, "fp8")
    reference = _engine(model_dir, None)
    assert fake_quantize_linears(reference.runner.model) > 0
    # the MoE kinds' experts are fp8 too: their reference fake-quantizes them as well
    assert (fake_quantize_experts(reference.runner.model) > 0) == (kind not in ("llama", "qwen2"))
    prompts = _prompts(len(kind))
    _assert_same(
        fp8.generate(prompts, GREEDY, return_logprob=True),
        reference.generate(prompts, GREEDY, return_logprob=True),
    )
    # fp8 weights take a quarter of float32's bytes in the converted layers
    assert fp8.runner.weight_bytes < reference.runner.weight_bytes


def test_a_worker_serves_fp8_through_the_router(worker_launcher, router_launcher, tiny_llama_dir):
    worker = worker_launcher(
        "--model-path", tiny_llama_dir, "--dtype", "float32", "--device", "cpu", "--quantization", "fp8",
        "--max-total-tokens", "4096", "--log-level", "warning",
    )  # fmt: skip
    url = router_launcher("--worker-addr", worker.zmq_address).url
    wait_until(lambda: len(live_workers(url)) == 1, 20.0, "the worker")
    prompts = _prompts(7)
    want = _engine(tiny_llama_dir, "fp8").generate(prompts, GREEDY)
    for prompt, w in zip(prompts, want, strict=True):
        body = {"input_ids": prompt, "sampling_params": GREEDY}
        resp = requests.post(url + "/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["output_ids"] == w["output_ids"]
    info = requests.get(url + "/get_server_info", timeout=10).json()
    assert "fp8" in str(info)  # the worker's arguments say what it serves
