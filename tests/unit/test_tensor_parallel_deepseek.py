"""Tensor parallelism over DeepSeek-V2 (MLA + DeepSeek MoE): TP=2 and TP=4 over gloo on the CPU
equal TP=1 and transformers.

Tiny random DeepSeek-V2 at TP=2 (q_proj, greedy routing) and its YaRN variant at TP=4 (low-rank q
through q_a_proj and q_b_proj, group-limited routing, scaled rope; one query head per rank): query heads split over the ranks, the latent KV
whole on every rank (each rank's pool holds the one latent "head"), the routed and shared experts
split by width. Greedy tokens equal to TP=1's and transformers' (float32), output logprobs within
1e-5, rank 0's expert-distribution record equal to TP=1's.
"""

from __future__ import annotations

import pytest

from tests.helpers.tensor_parallel_generate import check_sharded_generation, random_prompts
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

TP_SIZES = {"deepseek_v2": (2,), "deepseek_v2_yarn": (4,)}
PROMPT_LENS = (1, 9, 30)


@pytest.mark.parametrize("kind", sorted(TP_SIZES))
def test_sharded_deepseek_equals_tp1_and_transformers(kind, tmp_path):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    check_sharded_generation(model_dir, TP_SIZES[kind], random_prompts(PROMPT_LENS, seed=13))
