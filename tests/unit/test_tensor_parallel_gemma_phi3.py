"""Tensor parallelism over Gemma, Gemma 2 (TP=2) and Phi-3 (TP=4) over gloo on the CPU equals TP=1
and transformers.

Tiny random Gemma (MQA 4/1: its KV head replicated; GeGLU; the scaled, tied embedding split by
vocabulary), Gemma 2 (sliding windows, attention and final logit soft-capping, four norms per
layer) and Phi-3 (q/k/v and gate/up fused in the checkpoint, so each rank cuts each part of the
fused tensors; its 2 KV heads are replicated): greedy tokens equal to TP=1's and
transformers' (float32), output logprobs within 1e-5.
"""

from __future__ import annotations

import pytest

from tests.helpers.tensor_parallel_generate import check_sharded_generation, random_prompts
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

TP_SIZES = {"gemma": (2,), "gemma2": (2,), "phi3": (4,)}
PROMPT_LENS = (1, 9, 30)  # 30: past Gemma 2's and Phi-3's windows, in two prefill chunks


@pytest.mark.parametrize("kind", sorted(TP_SIZES))
def test_sharded_family_equals_tp1_and_transformers(kind, tmp_path):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    check_sharded_generation(model_dir, TP_SIZES[kind], random_prompts(PROMPT_LENS, seed=5))
