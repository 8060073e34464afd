"""fp8 weights on CPU: Fp8Linear against its fake-quantized float32 reference, which linears a model
converts, fp8 checkpoints (per channel and per tensor) read as published, and the formats refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fp8_linear import Fp8Linear, quantize_linears
from pdserve.shared.models.layers import MergedLinear
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.quantization import QuantizationError, fp8_scheme
from tests.helpers.fp8_checkpoint import (
    COMPRESSED_TENSORS,
    COMPRESSED_TENSORS_PER_TENSOR,
    FBGEMM,
    fp8_checkpoint,
)
from tests.helpers.fp8_reference import FakeQuantLinear
from tests.helpers.tiny_models import make_tiny_model, tiny_config


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_equals_its_fake_quantized_reference(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=bias)
    x = 3 * torch.randn(2, 5, 96)
    with torch.no_grad():
        got = Fp8Linear.quantized(linear)(x)
        want = FakeQuantLinear(linear)(x)
        exact = linear(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # what fp8 costs against the float32 layer: a few percent of the output's scale
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()


def test_a_merged_linear_keeps_its_shards():
    merged = MergedLinear(32, {"q_proj": 16, "k_proj": 8, "v_proj": 8}, bias=False)
    fp8 = Fp8Linear.quantized(merged)
    assert fp8.shards == merged.shards
    targets = fp8.named_checkpoint_targets("model.layers.0.self_attn.qkv_proj")
    assert targets["model.layers.0.self_attn.k_proj.weight_scale"][1] == slice(16, 24)
    assert set(targets) == {f"model.layers.0.self_attn.{s}.{a}" for s in ("q_proj", "k_proj", "v_proj")
                            for a in ("weight", "weight_scale")}  # fmt: skip


def test_quantize_linears_converts_the_layers_and_nothing_else():
    config = ModelConfig.from_hf_config(tiny_config("llama"), dtype="float32")
    model = load_model(config, None, "dummy")
    assert quantize_linears(model) == 4 * config.num_layers  # qkv, o, gate_up, down
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"
    assert {kinds[f"model.layers.0.{p}"] for p in ("self_attn.qkv_proj", "mlp.down_proj")} == {"Fp8Linear"}
    assert quantize_linears(model) == 0  # a second pass finds nothing left


def test_moe_routers_stay_in_the_model_dtype():
    config = ModelConfig.from_hf_config(tiny_config("qwen2_moe"), dtype="float32")
    model = load_model(config, None, "dummy", quantization="fp8")
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.mlp.gate"] == "Linear"
    assert kinds["model.layers.0.mlp.shared_expert_gate"] == "Linear"
    assert kinds["model.layers.0.self_attn.qkv_proj"] == "Fp8Linear"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("qc", [COMPRESSED_TENSORS, FBGEMM], ids=["compressed-tensors", "fbgemm_fp8"])
def test_a_per_channel_fp8_checkpoint_loads_as_quantizing_at_load_would(tiny_llama, tmp_path, qc):
    """Quantizing the float32 checkpoint at load and reading its per-channel fp8 export give the
    same weights, bit for bit, detected from the checkpoint without a flag."""
    fp8_dir = fp8_checkpoint(tiny_llama, tmp_path / "fp8", per_tensor=False, quantization_config=qc)
    at_load = load_model(ModelConfig.from_path(tiny_llama, dtype="float32"), tiny_llama, quantization="fp8")
    read = load_model(ModelConfig.from_path(fp8_dir, dtype="float32"), fp8_dir)
    a, b = dict(at_load.named_parameters()), dict(read.named_parameters())
    assert a.keys() == b.keys() and any(p.dtype == torch.float8_e4m3fn for p in b.values())
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    for name, value in a.items():
        assert torch.equal(bits(value), bits(b[name])), name


def test_a_per_tensor_fp8_checkpoint_spreads_each_scale_over_its_shard(tiny_llama, tmp_path):
    fp8_dir = fp8_checkpoint(
        tiny_llama, tmp_path / "fp8t", per_tensor=True, quantization_config=COMPRESSED_TENSORS_PER_TENSOR
    )
    model = load_model(ModelConfig.from_path(fp8_dir, dtype="float32"), fp8_dir)
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    for shard, (offset, size) in qkv.shards.items():
        want = tensors[f"model.layers.1.self_attn.{shard}.weight_scale"].item()
        assert torch.equal(qkv.weight_scale[offset : offset + size], torch.full((size,), want))
    x = torch.randn(3, qkv.in_features)
    dequant = qkv.weight.float() * qkv.weight_scale[:, None]
    torch.testing.assert_close(qkv(x), x @ dequant.t(), rtol=0.1, atol=0.1)  # x is rounded to fp8 too


def test_schemes_detected_and_refused():
    class Config:
        def __init__(self, qc):
            self.quantization_config = qc

    assert fp8_scheme(Config(None), None) is None
    assert fp8_scheme(Config(None), "fp8").checkpoint_is_fp8 is False
    scheme = fp8_scheme(Config({**COMPRESSED_TENSORS, "ignore": ["lm_head", "re:.*layers\\.0\\..*"]}), None)
    assert scheme.checkpoint_is_fp8 and scheme.keep("lm_head") and scheme.keep("model.layers.0.mlp.up_proj")
    assert not scheme.keep("model.layers.1.mlp.up_proj")
    assert fp8_scheme(Config({"quant_method": "fp8", "activation_scheme": "dynamic"}), None).checkpoint_is_fp8
    with pytest.raises(QuantizationError, match="block-wise"):
        fp8_scheme(Config({"quant_method": "fp8", "weight_block_size": [128, 128]}), None)
    with pytest.raises(QuantizationError, match="'awq' is not supported"):
        fp8_scheme(Config({"quant_method": "awq", "bits": 4}), None)
    int8 = {**COMPRESSED_TENSORS, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}}
    with pytest.raises(QuantizationError, match="compressed-tensors"):
        fp8_scheme(Config(int8), None)


def test_deepseek_v2_keeps_the_weight_its_attention_reads():
    config = ModelConfig.from_hf_config(tiny_config("deepseek_v2"), dtype="float32")
    model = load_model(config, None, "dummy", quantization="fp8")
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.kv_b_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.o_proj"] == "Fp8Linear"
