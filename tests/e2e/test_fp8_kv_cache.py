"""`--kv-cache-dtype fp8_e4m3|fp8_e5m2` on CPU: a mixed engine with an fp8 KV pool against the same
model whose float32 pool holds fake-quantized K/V (tests/helpers/fp8_kv_reference.py), with unit
scales and with the scales a checkpoint carries.

The bound: on CPU the torch attention reads an fp8 pool as stored * scale in float32, which is
bit for bit what the reference stored (quantize, then dequantize with the same scale, in the same
torch ops), and everything else is the same float32 model: greedy tokens are identical and
logprobs agree to 1e-5 (a margin for summation order; they are in fact equal). That the fp8 pool
is really in use shows against the plain float32 model, whose logprobs differ by far more.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.kv_pool import kv_cache_dtype
from tests.helpers.fp8_kv_reference import fake_quantize_kv_stores
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
FLAGS = ["fp8_e4m3", "fp8_e5m2"]


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in (5, 23, 40)]


def _engine(model_dir: str, kv: str = "auto") -> Engine:
    args = EngineArgs(
        model_path=model_dir, device="cpu", dtype="float32", kv_cache_dtype=kv, max_total_tokens=2048,
        chunked_prefill_size=16,  # prompts cross chunks: later chunks read earlier ones from the pool
    )  # fmt: skip
    return Engine(args)


def _reference(model_dir: str, flag: str, scales: torch.Tensor) -> Engine:
    engine = _engine(model_dir)
    fake_quantize_kv_stores(engine.runner.pool, kv_cache_dtype(flag, torch.float32), scales)
    return engine


def _logprob_gap(got: list[dict], want: list[dict]) -> float:
    gap = 0.0
    for g, w in zip(got, want, strict=True):
        assert g["output_ids"] == w["output_ids"]
        for (lp_g, _), (lp_w, _) in zip(
            g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"], strict=True
        ):
            gap = max(gap, abs(lp_g - lp_w))
    return gap


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("llama")))


@pytest.mark.parametrize("flag", FLAGS)
def test_fp8_pool_equals_the_fake_quantized_model(llama_dir, flag):
    fp8 = _engine(llama_dir, flag)
    pool = fp8.runner.pool
    assert pool.kv.dtype == kv_cache_dtype(flag, torch.float32) and pool.kv_scales is not None
    assert torch.equal(pool.kv_scales, torch.ones(3, 2))  # the tiny checkpoint carries no scales
    prompts = _prompts(len(flag))
    got = fp8.generate(prompts, GREEDY, return_logprob=True)
    want = _reference(llama_dir, flag, pool.kv_scales).generate(prompts, GREEDY, return_logprob=True)
    assert _logprob_gap(got, want) < 1e-5
    plain = _engine(llama_dir).generate(prompts, GREEDY, return_logprob=True)
    first_logprobs = [o["meta_info"]["output_token_logprobs"][0][0] for o in (got[0], plain[0])]
    assert abs(first_logprobs[0] - first_logprobs[1]) > 1e-4  # the fp8 rounding is really there


def test_checkpoint_kv_scales_reach_the_pool(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    # a checkpoint as llm-compressor writes one: per-layer k_scale/v_scale beside the weights
    # (layer 2 has none: it keeps 1.0), and q_scale, which pdserve has no use for
    tensors = load_file(model_dir / "model.safetensors")
    for layer, (k, v) in enumerate([(0.004, 0.002), (0.008, 0.003)]):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(v)
        tensors[f"model.layers.{layer}.self_attn.q_scale"] = torch.tensor(1.0)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    fp8 = _engine(str(model_dir), "fp8_e4m3")
    scales = fp8.runner.pool.kv_scales
    want = torch.tensor([[0.004, 0.002], [0.008, 0.003], [1.0, 1.0]])
    assert scales is not None and torch.equal(scales, want)
    prompts = _prompts(3)
    got = fp8.generate(prompts, GREEDY, return_logprob=True)
    reference = _reference(str(model_dir), "fp8_e4m3", scales)
    assert _logprob_gap(got, reference.generate(prompts, GREEDY, return_logprob=True)) < 1e-5
    # a 16-bit pool loads the same checkpoint and ignores the scales
    assert _engine(str(model_dir)).runner.pool.kv_scales is None


def test_an_fp8_pool_holds_more_tokens_for_the_same_bytes():
    from pdserve.shared.engine.kv_pool import KVPoolShape

    def pages(dtype: torch.dtype) -> int:
        return KVPoolShape.pages_for_budget(2**30, 32, 16, 8, 128, dtype)

    assert pages(torch.float8_e4m3fn) == 2 * pages(torch.bfloat16) == 4 * pages(torch.float32)
