"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pdserve.shared.models.gemma import Gemma2ForCausalLM, GemmaForCausalLM
from pdserve.shared.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from pdserve.shared.models.phi3 import Phi3ForCausalLM

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_MODEL_CLASSES)


def get_model_class(architectures: str | Sequence[str]) -> type[nn.Module]:
    """The class of the first supported name; ValueError naming them and the supported list."""
    names = [architectures] if isinstance(architectures, str) else list(architectures)
    for name in names:
        if name in _MODEL_CLASSES:
            return _MODEL_CLASSES[name]
    raise ValueError(
        f"model architecture {names} is not supported; supported: {', '.join(supported_architectures())}"
    )
