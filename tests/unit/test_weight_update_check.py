"""The weights-update check (shared/engine/weight_swap.py) reads a checkpoint's names and shapes
the way the model loads them: families whose checkpoints name or fuse tensors differently (Phi-3's
fused qkv/gate_up, MoE experts one per tensor or fused, task-model prefixes, reward heads) are
accepted by `/update_weights_from_disk` exactly when they would load, and a checkpoint of another
shape is still refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.shared.engine.weight_swap import WeightsUpdateError, apply_weights, check_weights
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import load_model
from tests.helpers.checkpoint_copies import perturbed_copy
from tests.helpers.tiny_classifiers import make_tiny_classifier
from tests.helpers.tiny_models import make_tiny_model
from tests.unit.test_models_moe import _fused_copy


def _check(model_dir: Path) -> None:
    config = ModelConfig.from_path(model_dir)
    check_weights(load_model(config, model_dir), config, str(model_dir))


@pytest.mark.parametrize("kind", ["phi3", "mixtral", "qwen2_moe", "gemma2", "llama"])
def test_generation_checkpoints_pass_their_own_check(kind: str, tmp_path: Path):
    _check(make_tiny_model(kind, tmp_path / kind))


def test_fused_moe_checkpoint_passes(tmp_path: Path):
    _check(_fused_copy(make_tiny_model("mixtral", tmp_path / "per_expert"), tmp_path / "fused"))


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta", "llama"])
def test_classifier_checkpoints_pass_their_own_check(kind: str, tmp_path: Path):
    _check(make_tiny_classifier(kind, tmp_path, num_labels=2))


def test_another_shape_is_refused_by_name(tmp_path: Path):
    served = make_tiny_model("phi3", tmp_path / "served")
    config = ModelConfig.from_path(served)
    model = load_model(config, served)
    other = make_tiny_classifier("llama", tmp_path / "other", num_labels=3)
    with pytest.raises(WeightsUpdateError, match="is a"):
        check_weights(model, config, str(other))
    two = make_tiny_classifier("llama", tmp_path / "two", num_labels=2)
    three_config = ModelConfig.from_path(other)
    with pytest.raises(WeightsUpdateError, match=r"score\.weight has shape \[2, "):
        check_weights(load_model(three_config, other), three_config, str(two))


def test_a_checkpoint_with_kv_cache_scales_updates_the_weights(tmp_path: Path):
    """KV scales (llm-compressor's k_scale/v_scale) are read at load only: an update skips them."""
    served = make_tiny_model("llama", tmp_path / "served")
    config = ModelConfig.from_path(served)
    model = load_model(config, served)
    other = perturbed_copy(served, tmp_path / "other", seed=7)
    weights_file = other / "model.safetensors"
    tensors = load_file(weights_file)
    for layer in range(config.num_layers):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.5)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, weights_file)
    apply_weights(model, check_weights(model, config, str(other)))
    expected = load_model(ModelConfig.from_path(other), other).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
