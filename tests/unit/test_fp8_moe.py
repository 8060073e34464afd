"""fp8 MoE experts on CPU: Fp8MoEExperts against its fake-quantized float32 reference, which experts
the pass converts (and what it leaves), and a per-channel fp8 MoE checkpoint read as published."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fp8_moe import Fp8MoEExperts, quantize_experts
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.moe_block import MoEExperts
from tests.helpers.fp8_checkpoint import COMPRESSED_TENSORS, fp8_checkpoint
from tests.helpers.fp8_reference import FakeQuantMoEExperts
from tests.helpers.tiny_models import make_tiny_model, tiny_config

NUM_EXPERTS, HIDDEN, INTER = 6, 40, 24


def _experts() -> MoEExperts:
    torch.manual_seed(0)
    experts = MoEExperts(NUM_EXPERTS, HIDDEN, INTER, ("gate_proj", "up_proj", "down_proj"), torch.float32)
    with torch.no_grad():
        experts.w13.normal_(0.0, HIDDEN**-0.5)
        experts.w2.normal_(0.0, INTER**-0.5)
    return experts


@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_fp8_experts_equal_their_fake_quantized_reference(top_k):
    """The same fp8 values and scales: only the order of float32 sums differs (~1e-6); against
    the float32 experts fp8 costs a few percent of the output's scale."""
    experts = _experts()
    x = 3 * torch.randn(13, HIDDEN)
    weights = torch.rand(13, top_k)
    ids = torch.stack([torch.randperm(NUM_EXPERTS)[:top_k] for _ in range(13)])
    ids[0] = 0  # every slot of a token on one expert
    with torch.no_grad():
        got = Fp8MoEExperts.quantized(experts)(x, weights, ids)
        want = FakeQuantMoEExperts(experts)(x, weights, ids)
        exact = experts(x, weights, ids)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()


def test_quantized_experts_hold_fp8_rows_with_their_scales():
    experts = _experts()
    fp8 = Fp8MoEExperts.quantized(experts)
    assert fp8.w13.dtype == fp8.w2.dtype == torch.float8_e4m3fn
    assert fp8.w13_scale.shape == (NUM_EXPERTS, 2 * INTER) and fp8.w2_scale.shape == (NUM_EXPERTS, HIDDEN)
    dequantized = fp8.w2.float() * fp8.w2_scale[..., None]
    # per-row e4m3: 3 mantissa bits, so each weight within 1/16 of its row's largest
    assert ((dequantized - experts.w2).abs() <= experts.w2.abs().amax(-1, keepdim=True) / 16).all()
    targets = fp8.expert_targets("mlp.experts")
    assert targets["mlp.experts.2.up_proj.weight_scale"][1] == (2, slice(INTER, 2 * INTER))
    assert targets["mlp.experts.5.down_proj.weight_scale"] == (fp8.w2_scale, 5)


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral"])
def test_the_fp8_pass_converts_every_moe_layer_and_keeps_the_routers(kind):
    config = ModelConfig.from_hf_config(tiny_config(kind), dtype="float32")
    model = load_model(config, None, "dummy", quantization="fp8")
    experts = [m for m in model.modules() if isinstance(m, MoEExperts)]
    assert experts and all(type(m) is Fp8MoEExperts for m in experts)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.mlp.gate"] == "Linear"
    assert quantize_experts(model) == 0  # a second pass finds nothing left
    kept = load_model(config, None, "dummy", quantization=None)
    assert not any(isinstance(m, Fp8MoEExperts) for m in kept.modules())


def test_experts_the_checkpoint_keeps_stay_unquantized():
    config = ModelConfig.from_hf_config(tiny_config("qwen2_moe"), dtype="float32")
    model = load_model(config, None, "dummy")
    assert quantize_experts(model, keep=lambda name: ".layers.1." in name) == 2
    assert type(model.get_submodule("model.layers.1.mlp.experts")) is MoEExperts
    with pytest.raises(ValueError, match="unquantized but not the rest"):
        quantize_experts(model, keep=lambda name: name.endswith("experts.0.gate_proj"))


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory) -> Path:
    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))


def test_a_per_channel_fp8_moe_checkpoint_loads_as_quantizing_at_load_would(tiny_qwen2_moe, tmp_path):
    """The experts' gate/up/down stored as fp8 with per-expert weight_scales (compressed-tensors):
    read without a flag, bit for bit what quantizing the float32 checkpoint at load gives."""
    fp8_dir = fp8_checkpoint(
        tiny_qwen2_moe, tmp_path / "fp8", per_tensor=False, quantization_config=COMPRESSED_TENSORS
    )
    at_load = load_model(
        ModelConfig.from_path(tiny_qwen2_moe, dtype="float32"), tiny_qwen2_moe, quantization="fp8"
    )
    read = load_model(ModelConfig.from_path(fp8_dir, dtype="float32"), fp8_dir)
    a, b = dict(at_load.named_parameters()), dict(read.named_parameters())
    assert a.keys() == b.keys() and b["model.layers.0.mlp.experts.w13"].dtype == torch.float8_e4m3fn
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    for name, value in a.items():
        assert torch.equal(bits(value), bits(b[name])), name
