"""Gemma, Gemma 2 and Phi-3 details the logit parity tests (test_models_tiny.py) do not show alone:
Phi-3's refusals (longrope, misshapen fused tensors); the embedding scale rounded to the model
dtype as transformers rounds it; dummy weights for Gemma's norms. The fast-path pass over Gemma
models: test_fast_path_gemma.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.gemma import GemmaRMSNorm, ScaledEmbedding
from pdserve.shared.models.layers import RMSNorm
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.weights import WeightLoadError
from tests.helpers.tiny_models import make_tiny_model, tiny_config


@pytest.mark.parametrize("rope_type", ["longrope", "su"])
def test_phi3_longrope_is_refused_by_name(rope_type):
    hf = tiny_config("phi3")
    hf.rope_parameters = {
        "rope_type": rope_type,
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 256,
    }
    with pytest.raises(ValueError, match=rf"rope type '{rope_type}' is not supported"):
        ModelConfig.from_hf_config(hf)


def test_phi3_fused_tensor_of_the_wrong_size_is_a_clear_error(tmp_path: Path):
    d = make_tiny_model("phi3", tmp_path)
    config = ModelConfig.from_path(d)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-8]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"qkv_proj.weight: checkpoint has 120 rows, model 128"):
        load_model(config, d)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 3072**0.5), (torch.bfloat16, 55.5)])
def test_embedding_scale_is_rounded_to_the_model_dtype(dtype, scale):
    embedding = ScaledEmbedding(4, 3072, dtype)
    assert embedding.scale == pytest.approx(scale, rel=1e-7)


def test_dummy_weights_leave_gemma_norms_the_identity():
    """Gemma scales by (1 + weight): dummy weights put 0 there, where other norms get 1."""
    model = load_model(ModelConfig.from_hf_config(tiny_config("gemma2")), None, "dummy")
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(isinstance(m, GemmaRMSNorm) for m in norms)
    assert all(torch.count_nonzero(m.weight) == 0 for m in norms)
    llama = load_model(ModelConfig.from_hf_config(tiny_config("llama")), None, "dummy")
    assert all(torch.all(m.weight == 1) for m in llama.modules() if isinstance(m, RMSNorm))
