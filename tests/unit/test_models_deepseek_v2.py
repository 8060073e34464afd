"""DeepSeek-V2 (MLA + DeepSeek MoE) against Hugging Face transformers on tiny random checkpoints
(CPU, float32), for both tiny kinds (tests/helpers/tiny_deepseek.py: V2-Lite's plain q_proj and
greedy routing; V2's q LoRA, group-limited routing and yarn rope).

Whole-prompt logits, chunked prefill then decode over shuffled pages, and a batch of three, all
within 1e-4 of HF; the engine's greedy tokens equal HF's generate, from the per-expert checkpoint
and from the fused state dict. The pool holds the compressed KV: one plane of
kv_lora_rank + qk_rope_head_dim per token and layer. Also the layer structure, the softmax scale
against transformers' yarn_apply_mscale, the expert-distribution recorder and the bench config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.expert_distribution import attach_expert_recorder
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.deepseek_moe import DeepseekV2MoeBlock
from pdserve.shared.models.deepseek_v2 import DeepseekV2ForCausalLM
from pdserve.shared.models.forward_batch import ForwardMode
from pdserve.shared.models.layers import GatedMLP
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.mla_attention import mla_softmax_scale
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_deepseek import DEEPSEEK_KINDS
from tests.helpers.tiny_models import make_tiny_model, tiny_config
from tests.unit.test_models_moe import _fused_copy
from tests.unit.test_models_tiny import ATOL, Tiny, _prompt

NEW_TOKENS = 12
BENCH_CONFIG = Path(__file__).resolve().parents[2] / "bench" / "configs" / "deepseek-v2-lite.json"


@pytest.fixture(scope="module", params=DEEPSEEK_KINDS)
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def test_pool_holds_one_latent_plane(tiny: Tiny):
    c = tiny.config
    assert (c.kv_planes, c.num_kv_heads, c.head_dim) == (1, 1, 32 + 8)
    pool = tiny.pool(num_pages=8)
    assert tuple(pool.kv.shape) == (3, 1, 8, 4, 1, 40)
    assert pool.v_buffers[2].data_ptr() == pool.k_buffers[2].data_ptr()
    assert pool.shape.bytes_per_token == 3 * 40  # per element byte: c_kv + k_pe, once per layer


def test_logits_match_hf_whole_chunked_and_batched(tiny: Tiny):
    ids = _prompt(21, seed=1)
    tiny.assert_whole_and_chunked_match_hf(ids)
    prompts = [_prompt(n, seed=10 + n) for n in (3, 11, 7)]
    tables = [[20, 4], [7, 31, 2], [13, 25]]
    flat = [t for p in prompts for t in p]
    together = tiny.run(tiny.pool(), ForwardMode.EXTEND, flat, [0, 0, 0], [len(p) for p in prompts], tables)
    assert (together - torch.cat([tiny.hf_logits(p) for p in prompts])).abs().max().item() < ATOL


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_engine_greedy_matches_hf_in_both_checkpoint_forms(kind: str, tmp_path: Path):
    per_expert = make_tiny_model(kind, tmp_path / "per_expert")
    fused = _fused_copy(per_expert, tmp_path / "fused")
    prompts = [_prompt(n, seed=n) for n in (1, 9, 40)]
    expected = [ids for ids, _ in hf_greedy(str(per_expert), prompts, NEW_TOKENS)]
    assert any(len(set(ids)) > 2 for ids in expected)  # a generation that says something
    greedy = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS}
    for model_dir in (per_expert, fused):
        args = EngineArgs(model_path=str(model_dir), device="cpu", dtype="float32", chunked_prefill_size=16)
        engine = Engine(args)
        assert engine.runner.pool.kv.shape[1] == 1
        one_by_one = [engine.generate([p], greedy)[0]["output_ids"] for p in prompts]
        batched = [out["output_ids"] for out in engine.generate(prompts, greedy)]
        assert one_by_one == expected, f"{model_dir.name}: one at a time"
        assert batched == expected, f"{model_dir.name}: batched"


def test_layers_dense_first_then_moe_with_shared_experts():
    model = load_model(ModelConfig.from_hf_config(tiny_config("deepseek_v2_yarn")), None, "dummy")
    assert isinstance(model, DeepseekV2ForCausalLM)
    mlps = [layer.mlp for layer in model.model.layers]
    assert type(mlps[0]) is GatedMLP and mlps[0].intermediate_size == 96
    assert all(isinstance(m, DeepseekV2MoeBlock) for m in mlps[1:])
    block = mlps[1]
    assert block.experts.w13.shape == (8, 32, 64) and block.gate.weight.dtype == torch.float32
    assert block.shared_experts is not None and block.shared_experts.intermediate_size == 32
    assert (block.topk_method, block.num_groups, block.topk_group, block.top_k) == (
        "group_limited_greedy",
        4,
        2,
        3,
    )
    attn = model.model.layers[0].self_attn
    assert attn.q_proj is None and attn.q_b_proj is not None
    hf = tiny_config("deepseek_v2")
    hf.num_hidden_layers, hf.moe_layer_freq = 5, 2  # DeepSeek's step (not in transformers' config)
    sparse = load_model(ModelConfig.from_hf_config(hf), None, "dummy")
    kinds = [isinstance(layer.mlp, DeepseekV2MoeBlock) for layer in sparse.model.layers]
    assert kinds == [False, False, True, False, True]


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_softmax_scale_folds_yarn_mscale_as_transformers(kind: str):
    from transformers.modeling_rope_utils import yarn_apply_mscale

    hf = tiny_config(kind)
    expected = yarn_apply_mscale(hf.rope_parameters, 24**-0.5)
    assert mla_softmax_scale(hf) == pytest.approx(expected, rel=1e-12)
    assert (mla_softmax_scale(hf) != 24**-0.5) == (kind == "deepseek_v2_yarn")


def test_expert_recorder_counts_moe_layers_only():
    config = ModelConfig.from_hf_config(tiny_config("deepseek_v2"))
    model = load_model(config, None, "dummy")
    recorder = attach_expert_recorder(
        model, EngineArgs(expert_distribution_recorder_mode="stat"), 3, torch.device("cpu")
    )
    assert recorder is not None and (recorder.num_layers, recorder.num_experts) == (3, 8)
    recorder.start()
    recorder.begin_forward(5)
    for layer in model.model.layers[1:]:
        layer.mlp(torch.randn(5, 64))
    recorder.end_forward()
    counts = recorder.logical_count().sum(0)
    assert counts[0].sum().item() == 0  # the dense layer
    assert counts[1].sum().item() == counts[2].sum().item() == 5 * 2  # tokens x top-k


def test_bench_config_is_deepseek_v2_lite():
    config = ModelConfig.from_path(BENCH_CONFIG)
    hf = config.hf_config
    assert config.architecture == "DeepseekV2ForCausalLM" and config.num_layers == 27
    assert (config.kv_planes, config.num_kv_heads, config.head_dim) == (1, 1, 576)
    assert (hf.q_lora_rank, hf.n_routed_experts, hf.num_experts_per_tok, hf.n_shared_experts) == (
        None,
        64,
        6,
        2,
    )
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert config.num_experts == 64 and hf.first_k_dense_replace == 1
