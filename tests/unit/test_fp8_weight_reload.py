"""`/update_weights_from_disk` on an fp8 model at the engine's level (shared/engine/weight_swap.py):
a reload gives the bits a fresh fp8 load gives, from a 16-bit checkpoint (quantized per row as it
streams) or from an fp8 export (copied with its scales), MoE experts included; a model the
update could not restore is refused before anything is copied."""

from __future__ import annotations

import pytest
import torch

from pdserve.shared.engine.weight_swap import WeightsUpdateError, apply_weights, check_weights
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import load_model
from tests.helpers.checkpoint_copies import perturbed_copy
from tests.helpers.fp8_checkpoint import FBGEMM, fp8_checkpoint
from tests.helpers.tiny_models import make_tiny_model


def _assert_same_bits(got: torch.nn.Module, want: torch.nn.Module) -> None:
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    a, b = dict(got.named_parameters()), dict(want.named_parameters())
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert value.dtype == b[name].dtype and torch.equal(bits(value), bits(b[name])), name


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_an_fp8_model_reloads_as_a_fresh_fp8_load(kind, tmp_path):
    src = make_tiny_model(kind, tmp_path / kind)
    config = ModelConfig.from_path(src, dtype="float32")
    model = load_model(config, perturbed_copy(src, tmp_path / "other", seed=3), quantization="fp8")
    assert any(p.dtype == torch.float8_e4m3fn for n, p in model.named_parameters() if ".experts" in n) == (
        kind == "qwen2_moe"
    )
    apply_weights(model, check_weights(model, config, str(src)), dtype=config.dtype)
    _assert_same_bits(model, load_model(config, src, quantization="fp8"))

    exported = fp8_checkpoint(src, tmp_path / "fp8", per_tensor=False, quantization_config=FBGEMM)
    model = load_model(config, tmp_path / "other", quantization="fp8")
    apply_weights(model, check_weights(model, config, str(exported)), dtype=config.dtype)
    _assert_same_bits(model, load_model(ModelConfig.from_path(exported, dtype="float32"), exported))


def test_an_fp8_model_on_dummy_weights_is_not_updated(tmp_path):
    src = make_tiny_model("llama", tmp_path / "llama")
    config = ModelConfig.from_path(src, dtype="float32")
    model = load_model(config, None, "dummy", quantization="fp8")
    with pytest.raises(WeightsUpdateError, match="dummy"):
        check_weights(model, config, str(src), served_load_format="dummy")
