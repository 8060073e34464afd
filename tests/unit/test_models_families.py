"""Gemma, Gemma 2 and Phi-3 details the logit parity tests (test_models_tiny.py) do not show alone:
the fast-path pass over Gemma models on CPU (Triton interpreter) leaves their (1 + w) norms and
GeGLU in torch and matches the plain model through both attention backends (sliding window and
soft-capping in the Triton kernels); Phi-3's refusals (longrope, misshapen fused tensors); the
embedding scale rounded to the model dtype as transformers rounds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.attention_triton import TritonAttention
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import RopeFusedAttention, TritonRotaryEmbedding, use_triton_kernels
from pdserve.shared.models.gemma import GeluGatedMLP, GemmaRMSNorm, ScaledEmbedding
from pdserve.shared.models.layers import RMSNorm
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.weights import WeightLoadError
from tests.helpers.tiny_models import make_tiny_model, tiny_config
from tests.unit.test_fast_path import ATOL, _OpCounts, _pool, _run


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def gemma(request, tmp_path_factory):
    model_dir = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return ModelConfig.from_path(model_dir), model_dir


def test_fast_path_leaves_gemma_norms_and_geglu_in_torch(gemma):
    config, model_dir = gemma
    plain, fast = load_model(config, model_dir), load_model(config, model_dir)
    norms = [m for m in fast.modules() if isinstance(m, GemmaRMSNorm)]
    mlps = [m for m in fast.modules() if isinstance(m, GeluGatedMLP)]
    # only rope moves to kernels: the embedding and each layer's attention
    assert use_triton_kernels(fast) == 1 + config.num_layers
    assert [m for m in fast.modules() if type(m) is GemmaRMSNorm] == norms
    assert [m for m in fast.modules() if type(m) is GeluGatedMLP] == mlps
    assert type(fast.model.embed_tokens) is ScaledEmbedding
    assert isinstance(fast.model.rotary_emb, TritonRotaryEmbedding)
    for before, layer in zip(plain.model.layers, fast.model.layers):
        attn = layer.self_attn
        assert isinstance(attn, RopeFusedAttention)
        assert (attn.window, attn.softcap, attn.scale) == (
            before.self_attn.window,
            before.self_attn.softcap,
            before.self_attn.scale,
        )
    if config.architecture == "Gemma2ForCausalLM":
        assert [layer.self_attn.window for layer in fast.model.layers] == [8, None, 8]
        assert all(layer.self_attn.softcap == 2.0 for layer in fast.model.layers)
    plain_pool, fast_pool = _pool(config), _pool(config)
    want = _run(plain, config, TorchRefAttention, plain_pool)
    with _OpCounts() as ops:
        got = _run(fast, config, TritonAttention, fast_pool)
    for (want_hidden, want_logits), (got_hidden, got_logits) in zip(want, got):
        assert want_logits.abs().max().item() > 0.1
        torch.testing.assert_close(got_hidden, want_hidden, rtol=0, atol=ATOL)
        torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(fast_pool.kv, plain_pool.kv, rtol=0, atol=ATOL)
    assert "pdserve.rmsnorm" not in ops.counts and "pdserve.silu_and_mul" not in ops.counts


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
