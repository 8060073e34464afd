"""The MoE families (Qwen2-MoE, Mixtral) against Hugging Face transformers on tiny random
checkpoints (CPU, float32).

For every tiny MoE kind (tests/helpers/tiny_models.py: MOE_KINDS, one of them with dense layers
from decoder_sparse_step and mlp_only_layers): whole-prompt logits and chunked prefill then decode
over shuffled pages equal HF's within 1e-4; the engine's greedy tokens over a short generation
equal HF's, from the per-expert checkpoint `save_pretrained` writes and from the fused state dict
transformers holds in memory. Also dummy weights, the config's MoE fields, and the bench config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import TritonMoEExperts, use_triton_kernels
from pdserve.shared.models.forward_batch import ForwardMode
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.moe_block import SparseMoeBlock
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.tiny_models import MOE_KINDS, make_tiny_model, tiny_config
from tests.unit.test_models_tiny import ATOL, Tiny, _prompt

NEW_TOKENS = 12
BENCH_CONFIG = Path(__file__).resolve().parents[2] / "bench" / "configs" / "qwen1.5-moe-a2.7b.json"


@pytest.fixture(scope="module", params=MOE_KINDS)
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def _fused_copy(src: Path, dest: Path) -> Path:
    """The checkpoint as transformers holds it in memory: experts fused into 3-D tensors."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    dest.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dest / f.name).write_bytes(f.read_bytes())
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    assert any(k.endswith(".experts.gate_up_proj") for k in tensors)  # really the fused form
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_logits_match_hf_whole_and_chunked(tiny: Tiny):
    ids = _prompt(21, seed=1)
    tiny.assert_whole_and_chunked_match_hf(ids)


def test_fast_path_swaps_in_the_fused_moe_kernel(tmp_path: Path):
    """The Triton pass (interpreter here) replaces every MoEExperts by the fused kernel, logits unchanged."""
    tiny = Tiny("qwen2_moe", make_tiny_model("qwen2_moe", tmp_path / "m"))
    ids = _prompt(13, seed=3)
    ref = tiny.hf_logits(ids)
    use_triton_kernels(tiny.model)
    fused = [m for m in tiny.model.modules() if isinstance(m, TritonMoEExperts)]
    assert len(fused) == sum(isinstance(m, SparseMoeBlock) for m in tiny.model.modules()) > 0
    got = tiny.run(tiny.pool(), ForwardMode.EXTEND, ids, [0], [len(ids)], [[3, 4, 5, 6]])
    assert (got - ref).abs().max().item() < ATOL


def test_layers_follow_sparse_step_and_mlp_only_layers():
    config = ModelConfig.from_hf_config(tiny_config("qwen2_moe_sparse"))
    model = load_model(config, None, "dummy")
    kinds = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert kinds == [False, True, False, False]  # (i + 1) % 2 == 0 gives 1 and 3; 3 is mlp-only
    block = model.model.layers[1].mlp
    assert block.experts.w13.shape == (8, 64, 64) and block.experts.w2.shape == (8, 64, 32)
    assert block.shared_expert is not None and block.renormalize
    assert config.num_experts == 8 and config.num_experts_per_tok == 2


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_engine_greedy_matches_hf_in_both_checkpoint_forms(kind: str, tmp_path: Path):
    per_expert = make_tiny_model(kind, tmp_path / "per_expert")
    fused = _fused_copy(per_expert, tmp_path / "fused")
    prompts = [_prompt(n, seed=n) for n in (1, 9, 40)]
    reference = hf_greedy(str(per_expert), prompts, NEW_TOKENS)
    assert any(len(set(ids)) > 2 for ids, _ in reference)  # a generation that says something
    for model_dir in (per_expert, fused):
        engine = Engine(EngineArgs(model_path=str(model_dir), device="cpu", dtype="float32"))
        greedy = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS}
        one_by_one = [engine.generate([p], greedy)[0]["output_ids"] for p in prompts]
        batched = [out["output_ids"] for out in engine.generate(prompts, greedy)]
        expected = [ids for ids, _ in reference]
        assert one_by_one == expected, f"{model_dir.name}: one at a time"
        assert batched == expected, f"{model_dir.name}: batched"


def test_dummy_weights_fill_the_experts():
    config = ModelConfig.from_hf_config(tiny_config("mixtral"))
    model = load_model(config, None, "dummy", seed=5)
    w13 = model.model.layers[0].mlp.experts.w13
    assert abs(w13.std().item() - 0.02) < 0.002 and not w13.requires_grad


def test_bench_config_is_qwen15_moe_a27b():
    config = ModelConfig.from_path(BENCH_CONFIG)
    assert config.architecture == "Qwen2MoeForCausalLM"
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_kv_heads) == (
        24,
        2048,
        16,
        16,
    )
    assert (config.num_experts, config.num_experts_per_tok) == (60, 4)
    hf = config.hf_config
    assert (hf.moe_intermediate_size, hf.shared_expert_intermediate_size, hf.intermediate_size) == (
        1408,
        5632,
        5632,
    )
    # built on the meta device, as the loader does: every layer sparse, the block's stacked shapes
    with torch.device("meta"):
        from pdserve.shared.models.registry import get_model_class

        model = get_model_class(config.architectures)(config)
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers)
    assert model.model.layers[0].mlp.experts.w13.shape == (60, 2 * 1408, 2048)
    total = sum(p.numel() for p in model.parameters())
    assert 14.0e9 < total < 14.5e9  # Qwen1.5-MoE-A2.7B has 14.3B parameters
