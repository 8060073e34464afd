"""Greedy output of the engine equals Hugging Face transformers (CPU, float32) for the families with
per-layer attention features: Gemma, Gemma 2 (sliding window 8 on alternate layers, attention and
final logit soft-capping), Phi-3 (fused checkpoint tensors, window 12) and Mistral with a window of
8, every prompt but the shortest longer than its window.

Through the torch attention backend and the Triton one (kernels in the interpreter, the fast-path
pass applied), each engine generates the prompts in one batch with chunked prefill (chunks of 8
tokens, shorter than the prompts), then the longest prompt again after a request sharing its
prefix (a radix hit): token-identical to transformers, logprobs of the chosen tokens within 1e-4.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import VOCAB_SIZE, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NEW_TOKENS = 10
PROMPT_LENGTHS = (3, 21, 37)


@pytest.fixture(scope="module", params=["gemma", "gemma2", "phi3", "mistral_swa"])
def case(request, tmp_path_factory):
    model_dir = str(make_tiny_model(request.param, Path(tmp_path_factory.mktemp(request.param))))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENGTHS]
    return model_dir, prompts, hf_greedy(model_dir, prompts, NEW_TOKENS)


def _greedy(**extra) -> dict:
    return {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, **extra}


def _assert_same(outputs: list[dict], reference, label: str) -> None:
    for i, (out, (ref_ids, ref_lps)) in enumerate(zip(outputs, reference)):
        assert out["output_ids"] == ref_ids, f"{label}: prompt {i} differs from transformers"
        lps = [lp for lp, _ in out["meta_info"]["output_token_logprobs"]]
        assert torch.allclose(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4), f"{label}: prompt {i}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_batch_and_prefix_hit_match_transformers(case, backend):
    model_dir, prompts, reference = case
    engine = Engine(
        EngineArgs(
            model_path=model_dir,
            device="cpu",
            dtype="float32",
            attention_backend=backend,
            page_size=4,
            chunked_prefill_size=8,
            max_total_tokens=512,
        )
    )
    batched = engine.generate(prompts, _greedy(), return_logprob=True)
    _assert_same(batched, reference, f"{backend}, chunked batch")
    longest = prompts[-1]
    engine.generate([longest[:-3] + [longest[-1]]], _greedy(max_new_tokens=1))
    out = engine.generate([longest], _greedy(), return_logprob=True)[0]
    assert out["meta_info"]["cached_tokens"] >= 24  # whole 4-token pages of the shared 34 tokens
    _assert_same([out], reference[-1:], f"{backend}, radix hit")
