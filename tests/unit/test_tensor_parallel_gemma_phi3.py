"""Tensor parallelism over Gemma, Gemma 2 and Phi-3: TP=2 (and TP=4 for Phi-3) over gloo on the CPU
equals TP=1 and transformers.

Tiny random Gemma (MQA 4/1: its KV head replicated; GeGLU; the scaled, tied embedding split by
vocabulary), Gemma 2 (sliding windows, attention and final logit soft-capping, four norms per
layer) and Phi-3 (q/k/v and gate/up fused in the checkpoint, so each rank cuts each part of the
fused tensors; at TP=4 its 2 KV heads are replicated): greedy tokens equal to TP=1's and
transformers' (float32), output logprobs within 1e-5.
"""

from __future__ import annotations

import random

import pytest

from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tensor_parallel_generate import assert_tp_parity, tp_generate
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

TP_SIZES = {"gemma": (2,), "gemma2": (2,), "phi3": (2, 4)}
PROMPT_LENS = (1, 9, 30)  # 30: past Gemma 2's and Phi-3's windows, in two prefill chunks
MAX_NEW = 6
LOGPROB_TOL = 1e-5


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("kind", sorted(TP_SIZES))
def test_sharded_family_equals_tp1_and_transformers(kind, tmp_path):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    single, _ = tp_generate(model_dir, 1, _prompts(), MAX_NEW)
    reference = hf_greedy(model_dir, _prompts(), MAX_NEW)
    for tp_size in TP_SIZES[kind]:
        sharded, _ = tp_generate(model_dir, tp_size, _prompts(), MAX_NEW)
        assert_tp_parity(single, sharded, reference, LOGPROB_TOL)
