"""Greedy output of the engine equals Hugging Face transformers (CPU, float32) for Qwen2-MoE through
the Triton path (kernels in the interpreter, the fast-path pass applied: routing in one kernel, the
shared expert's gate merged into the router's GEMM, the fused MoE): the prompts in one batch with
chunked prefill (chunks of 8 tokens), token-identical, logprobs of the chosen tokens within 1e-4.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.models.fast_moe import TritonSparseMoeBlock
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import VOCAB_SIZE, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NEW_TOKENS = 8
PROMPT_LENGTHS = (3, 21)


def test_qwen2_moe_triton_path_matches_transformers(tmp_path: Path):
    model_dir = str(make_tiny_model("qwen2_moe", tmp_path / "qwen2_moe"))
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    assert any(len(set(ids)) > 2 for ids, _ in reference)  # a generation that says something
    engine = Engine(
        EngineArgs(
            model_path=model_dir,
            device="cpu",
            dtype="float32",
            attention_backend="triton",
            page_size=4,
            chunked_prefill_size=8,
            max_total_tokens=256,
        )
    )
    assert any(isinstance(m, TritonSparseMoeBlock) for m in engine.runner.model.modules())
    greedy = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS}
    outputs = engine.generate(prompts, greedy, return_logprob=True)
    for i, (out, (ref_ids, ref_lps)) in enumerate(zip(outputs, reference)):
        assert out["output_ids"] == ref_ids, f"prompt {i} differs from transformers"
        lps = torch.tensor([lp for lp, _ in out["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(lps, torch.tensor(ref_lps), atol=1e-4), f"prompt {i}"
