"""On a CUDA GPU: the fast path (Triton attention and kernels, decode CUDA graphs) gives the tokens
and logprobs of the plain torch path, in float32 (exact greedy) and bfloat16 (close logprobs)."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

PARAMS = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}


def _prompts(n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice((1, 9, 40, 130)))] for _ in range(n)]


def _run(model_dir: str, prompts, dtype: str, **overrides):
    engine = Engine(
        EngineArgs(model_path=model_dir, device="cuda", dtype=dtype, max_total_tokens=16384, **overrides)
    )
    try:
        outs = engine.generate(prompts, PARAMS, return_logprob=True)
        graphs = engine.runner.graphs
        return outs, type(engine.runner.attn_backend).__name__, graphs
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def _logprobs(out) -> torch.Tensor:
    return torch.tensor([lp for lp, _ in out["meta_info"]["output_token_logprobs"]])


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fast_path_float32_equals_torch_path(kind: str, tmp_path: Path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model(kind, tmp_path))
    # 3 and 11 requests: decode batches that pad up to a bucket (4, 16) while requests finish
    for n in (1, 3, 11):
        prompts = _prompts(n, 500)
        ref, ref_backend, ref_graphs = _run(
            model_dir, prompts, "float32", attention_backend="torch", disable_cuda_graph=True
        )
        got, backend, graphs = _run(model_dir, prompts, "float32", cuda_graph_max_bs=16)
        assert ref_backend == "TorchRefAttention" and ref_graphs is None
        assert backend == "TritonAttention" and graphs is not None
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a["output_ids"] == b["output_ids"], f"{kind} n={n} prompt {i}"
            assert torch.allclose(_logprobs(a), _logprobs(b), atol=1e-4)


def test_fast_path_bfloat16_stays_close_to_torch_path(tmp_path: Path):
    model_dir = str(make_tiny_model("llama", tmp_path))
    prompts = _prompts(6, 500)
    ref, _, _ = _run(model_dir, prompts, "bfloat16", attention_backend="torch", disable_cuda_graph=True)
    got, _, _ = _run(model_dir, prompts, "bfloat16")
    # bf16 roundings differ between kernels: compare the first tokens and the logprobs of the
    # common prefix, not whole sequences
    for a, b in zip(got, ref):
        assert a["output_ids"][0] == b["output_ids"][0]
        common = 0
        while common < len(a["output_ids"]) and a["output_ids"][common] == b["output_ids"][common]:
            common += 1
        diff = (_logprobs(a)[:common] - _logprobs(b)[:common]).abs().max()
        assert diff < 0.1, diff
