"""On a CUDA GPU in float32, the engine's greedy output equals transformers' for tiny random models."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_greedy_parity_cuda_float32(kind: str, tmp_path: Path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model(kind, tmp_path))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rng = random.Random(1)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 33, 64, 130, 257)]
    reference = hf_greedy(model_dir, prompts, 24)
    # the first engine sizes its pool from --mem-fraction-static; each is freed before the next
    for overrides in (
        {"mem_fraction_static": 0.5},
        {"chunked_prefill_size": 32, "max_total_tokens": 8192},
        {"max_total_tokens": 512},
    ):
        engine = Engine(EngineArgs(model_path=model_dir, device="cuda", dtype="float32", **overrides))
        outs = engine.generate(prompts, {"temperature": 0.0, "max_new_tokens": 24}, return_logprob=True)
        if overrides.get("max_total_tokens") == 512:
            assert engine.stats.num_retractions > 0
        if "max_total_tokens" not in overrides:
            assert engine.max_total_num_tokens > 100_000  # a fraction of the H100's memory, not a default
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        for i, (out, (ids, lps)) in enumerate(zip(outs, reference)):
            assert out["output_ids"] == ids, f"{kind} {overrides}: prompt {i}"
            got = torch.tensor([lp for lp, _ in out["meta_info"]["output_token_logprobs"]])
            assert torch.allclose(got, torch.tensor(lps), atol=1e-4)
