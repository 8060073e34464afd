"""The fast-path pass over tiny random Gemma and Gemma 2 (float32, CPU, Triton interpreter).

Their (1 + weight) norms and GeGLU MLPs move to kernels of their own (kernels.gemma_rmsnorm,
kernels.gelu_and_mul) along with rope, and the model matches the plain one within 1e-5 through a
batched prefill, a chunk on a cached prefix and a decode step, with sliding windows and
soft-capping in the Triton attention kernels; an engine on the Triton backend (which applies the
pass) generates the greedy tokens of one on the torch backend.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.attention_triton import TritonAttention
from pdserve.shared.engine.engine import Engine
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import (
    RopeFusedAttention,
    TritonGeluGatedMLP,
    TritonGemmaRMSNorm,
    TritonRotaryEmbedding,
    use_triton_kernels,
)
from pdserve.shared.models.gemma import GeluGatedMLP, GemmaRMSNorm, ScaledEmbedding
from pdserve.shared.models.loader import load_model
from tests.helpers.tiny_models import make_tiny_model
from tests.unit.test_fast_path import ATOL, _OpCounts, _pool, _run, _steps
from tests.unit.test_models_tiny import _prompt


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def gemma(request, tmp_path_factory):
    model_dir = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return ModelConfig.from_path(model_dir), model_dir


def test_pass_swaps_gemma_norms_and_geglu_and_matches_the_plain_model(gemma):
    config, model_dir = gemma
    plain, fast = load_model(config, model_dir), load_model(config, model_dir)
    params_before = {name: p.data_ptr() for name, p in fast.named_parameters()}
    norms = sum(type(m) is GemmaRMSNorm for m in fast.modules())
    mlps = sum(type(m) is GeluGatedMLP for m in fast.modules())
    assert (
        mlps == config.num_layers
        and norms == (4 if config.architecture == "Gemma2ForCausalLM" else 2) * mlps + 1
    )
    # the norms, the MLPs, the rotary embedding and each layer's attention
    assert use_triton_kernels(fast) == norms + mlps + 1 + config.num_layers
    assert use_triton_kernels(fast) == 0
    assert {name: p.data_ptr() for name, p in fast.named_parameters()} == params_before
    assert not any(type(m) in (GemmaRMSNorm, GeluGatedMLP) for m in fast.modules())
    assert sum(isinstance(m, TritonGemmaRMSNorm) for m in fast.modules()) == norms
    assert all(isinstance(layer.mlp, TritonGeluGatedMLP) for layer in fast.model.layers)
    assert fast.model.norm.neutral_weight == 0.0  # dummy weights still see a Gemma norm
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
        assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))
    torch.testing.assert_close(fast_pool.kv, plain_pool.kv, rtol=0, atol=ATOL)
    steps = len(_steps())
    assert (
        ops.counts["pdserve.gemma_rmsnorm"] + ops.counts["pdserve.gemma_fused_add_rmsnorm_"] == steps * norms
    )
    assert ops.counts["pdserve.gelu_and_mul"] == steps * mlps
    assert not {"pdserve.rmsnorm", "pdserve.fused_add_rmsnorm_", "pdserve.silu_and_mul"} & set(ops.counts)


def test_engine_on_the_triton_backend_generates_the_same_greedy_tokens(gemma):
    _, model_dir = gemma
    prompts = [_prompt(n, seed=n) for n in (2, 5)]
    greedy = {"temperature": 0.0, "max_new_tokens": 4}
    outputs = {}
    for backend in ("torch", "triton"):
        args = EngineArgs(model_path=str(model_dir), device="cpu", dtype="float32", attention_backend=backend)
        engine = Engine(args)
        swapped = [m for m in engine.runner.model.modules() if isinstance(m, TritonGemmaRMSNorm)]
        assert bool(swapped) == (backend == "triton")
        outputs[backend] = [out["output_ids"] for out in engine.generate(prompts, greedy)]
    assert (
        all(len(ids) == 4 for ids in outputs["torch"])
        and len({t for ids in outputs["torch"] for t in ids}) > 2
    )
    assert outputs["triton"] == outputs["torch"]
