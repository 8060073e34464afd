"""Tensor parallelism over DeepSeek-V2 (MLA + DeepSeek MoE): TP=2 and TP=4 over gloo on the CPU
equal TP=1 and transformers.

Tiny random DeepSeek-V2 (q_proj, greedy routing) and its YaRN variant (low-rank q through q_a_proj
and q_b_proj, group-limited routing, scaled rope): query heads split over the ranks, the latent KV
whole on every rank (each rank's pool holds the one latent "head"), the routed and shared experts
split by width. Greedy tokens equal to TP=1's and transformers' (float32), output logprobs within
1e-5, rank 0's expert-distribution record equal to TP=1's.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tensor_parallel_generate import assert_tp_parity, tp_generate
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

TP_SIZES = {"deepseek_v2": (2,), "deepseek_v2_yarn": (2, 4)}
PROMPT_LENS = (1, 9, 30)
MAX_NEW = 6
LOGPROB_TOL = 1e-5


def _prompts() -> list[list[int]]:
    rng = random.Random(13)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("kind", sorted(TP_SIZES))
def test_sharded_deepseek_equals_tp1_and_transformers(kind, tmp_path):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    single, single_counts = tp_generate(model_dir, 1, _prompts(), MAX_NEW)
    reference = hf_greedy(model_dir, _prompts(), MAX_NEW)
    assert single_counts is not None and single_counts.sum() > 0
    for tp_size in TP_SIZES[kind]:
        sharded, counts = tp_generate(model_dir, tp_size, _prompts(), MAX_NEW)
        assert_tp_parity(single, sharded, reference, LOGPROB_TOL)
        assert counts is not None and torch.equal(counts, single_counts), tp_size
