"""Tensor parallelism at the engine: TP=2 over gloo on the CPU equals TP=1 and transformers.

The test process is rank 0 (an Engine built with tp_size 2 after `TensorParallelRanks` started
rank 1 as a real process); greedy tokens must equal a TP=1 engine's and transformers' (float32),
output logprobs within 1e-5 of TP=1's and of transformers', on tiny random Llama (GQA 4/2), Qwen2
(MQA 4/1: its KV head replicated on both ranks; q/k/v biases; tied embeddings), Qwen3 (q/k norms)
and Mistral (8/4). A batch of prompts runs chunked prefill (pages shared by both ranks' pools) and
decode; afterwards the follower ran passes and every page is back.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tensor_parallel_generate import assert_tp_parity, tp_generate
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

KINDS = ("llama", "qwen2", "qwen3", "mistral")
PROMPT_LENS = (1, 7, 23, 40)
MAX_NEW = 6
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory) -> str:
    return str(make_tiny_model(request.param, Path(tmp_path_factory.mktemp(request.param))))


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in PROMPT_LENS]


def test_tp2_equals_tp1_and_transformers(model_dir):
    single, _ = tp_generate(model_dir, 1, _prompts(), MAX_NEW)
    sharded, _ = tp_generate(model_dir, 2, _prompts(), MAX_NEW)
    reference = hf_greedy(model_dir, _prompts(), MAX_NEW)
    assert_tp_parity(single, sharded, reference, LOGPROB_TOL)


def test_other_architectures_and_unsplittable_shapes_are_refused_by_name():
    from pdserve.shared.models.config import ModelConfig
    from pdserve.shared.models.tensor_parallel import check_tensor_parallel
    from tests.helpers.tiny_classifiers import tiny_classifier_config
    from tests.helpers.tiny_models import tiny_config

    reward = ModelConfig.from_hf_config(tiny_classifier_config("llama", num_labels=1))
    check_tensor_parallel(reward, 1)  # one rank: nothing to shard
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        check_tensor_parallel(reward, 2)
    llama = ModelConfig.from_hf_config(tiny_config("llama"))  # 4 heads, 2 KV heads
    check_tensor_parallel(llama, 4)  # each KV head replicated on 2 ranks
    with pytest.raises(ValueError, match="3 ranks"):
        check_tensor_parallel(llama, 3)
    check_tensor_parallel(llama, 2, "fp8")  # fp8 shards (test_tensor_parallel_fp8.py)
    with pytest.raises(ValueError, match="awq"):
        check_tensor_parallel(llama, 2, "awq")


def test_shard_rule_pads_the_vocabulary_with_zeros():
    import torch

    from pdserve.shared.models.tensor_parallel import ShardRule

    table = torch.arange(10.0).reshape(5, 2)  # a vocabulary of 5 over 2 ranks: 3 rows each
    assert ShardRule(0, 0, 3).apply(table).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert ShardRule(0, 3, 3).apply(table).tolist() == [[6, 7], [8, 9], [0, 0]]
    assert ShardRule(1, 1, 1).apply(table).tolist() == [[1], [3], [5], [7], [9]]
