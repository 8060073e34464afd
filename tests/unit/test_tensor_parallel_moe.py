"""Tensor parallelism over the MoE families: TP=2 and TP=4 over gloo on the CPU equal TP=1 and
transformers (each kind at one size: a TP run costs process starts).

Tiny random Mixtral at TP=2 (8 experts of 32 split in halves, GQA 4/2) and Qwen2-MoE at TP=4 (a
dense layer, a sparse layer with a shared expert of 48, an MLP-only layer, tied embeddings; its 2
KV heads replicated):
greedy tokens equal to TP=1's and transformers' (float32), output logprobs within 1e-5, and rank
0's expert-distribution record equal to TP=1's (routing is replicated, so rank 0 counts it all).
The checkpoint-cutting rules are checked on both forms an MoE checkpoint takes (one tensor per
expert; transformers' fused experts), and an expert width that does not split is refused by name.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import meta_model
from pdserve.shared.models.tensor_parallel import check_tensor_parallel, shard_checkpoint, shard_model
from pdserve.shared.models.tensor_parallel_layers import TPRank
from tests.helpers.tensor_parallel_generate import check_sharded_generation, random_prompts
from tests.helpers.tiny_models import make_tiny_model, tiny_config

pytestmark = pytest.mark.slow

TP_SIZES = {"mixtral": (2,), "qwen2_moe_sparse": (4,)}
PROMPT_LENS = (1, 7, 23, 40)


@pytest.mark.parametrize("kind", sorted(TP_SIZES))
def test_sharded_moe_equals_tp1_and_transformers(kind, tmp_path):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    check_sharded_generation(model_dir, TP_SIZES[kind], random_prompts(PROMPT_LENS, seed=11))


def test_expert_tensors_are_cut_alike_in_both_checkpoint_forms():
    config = ModelConfig.from_hf_config(tiny_config("mixtral"))  # 8 experts of 32, hidden 64
    rank = TPRank(1, 2)
    model = meta_model(config)
    rules = shard_model(model, config, rank)
    block = model.model.layers[0].mlp
    assert tuple(block.experts.w13.shape) == (8, 32, 64) and tuple(block.experts.w2.shape) == (8, 64, 16)
    gate_up = torch.randn(8, 64, 64)  # [E, 2*I, H]: gate rows, then up rows
    down = torch.randn(8, 64, 32)
    fused = dict(
        shard_checkpoint(
            [
                ("model.layers.0.mlp.experts.gate_up_proj", gate_up),
                ("model.layers.0.mlp.experts.down_proj", down),
            ],
            rules,
        )
    )
    per_expert = dict(
        shard_checkpoint(
            [
                ("model.layers.0.block_sparse_moe.experts.5.w1.weight", gate_up[5, :32]),
                ("model.layers.0.block_sparse_moe.experts.5.w3.weight", gate_up[5, 32:]),
                ("model.layers.0.block_sparse_moe.experts.5.w2.weight", down[5]),
            ],
            rules,
        )
    )
    want_gate, want_up = gate_up[:, 16:32], gate_up[:, 48:64]  # rank 1's half of each part
    assert torch.equal(fused["model.layers.0.mlp.experts.gate_up_proj"], torch.cat([want_gate, want_up], 1))
    assert torch.equal(fused["model.layers.0.mlp.experts.down_proj"], down[:, :, 16:])
    assert torch.equal(per_expert["model.layers.0.block_sparse_moe.experts.5.w1.weight"], want_gate[5])
    assert torch.equal(per_expert["model.layers.0.block_sparse_moe.experts.5.w3.weight"], want_up[5])
    assert torch.equal(per_expert["model.layers.0.block_sparse_moe.experts.5.w2.weight"], down[5, :, 16:])


def test_an_expert_width_that_does_not_split_is_refused_by_name():
    hf = tiny_config("qwen2_moe")
    hf.shared_expert_intermediate_size = 50
    config = ModelConfig.from_hf_config(hf)
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size 50 does not split over 4"):
        check_tensor_parallel(config, 4)


def test_fp8_experts_under_tp_are_refused_by_name():
    config = ModelConfig.from_hf_config(tiny_config("mixtral"))
    with pytest.raises(ValueError, match="fp8 weights of MixtralForCausalLM are not sharded yet"):
        check_tensor_parallel(config, 2, "fp8")
    check_tensor_parallel(config, 2, None)
