"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pdserve.shared.models.bert import BertModel, XLMRobertaModel
from pdserve.shared.models.decoder_embedding import LlamaModel, MistralModel, Qwen2Model
from pdserve.shared.models.deepseek_v2 import DeepseekV2ForCausalLM
from pdserve.shared.models.gemma import Gemma2ForCausalLM, GemmaForCausalLM
from pdserve.shared.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from pdserve.shared.models.mixtral import MixtralForCausalLM
from pdserve.shared.models.phi3 import Phi3ForCausalLM
from pdserve.shared.models.qwen2_moe import Qwen2MoeForCausalLM
from pdserve.shared.models.sequence_classification import (
    BertForSequenceClassification,
    LlamaForSequenceClassification,
    MistralForSequenceClassification,
    Qwen2ForSequenceClassification,
    XLMRobertaForSequenceClassification,
)

_MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    # embedding models (shared/models/pooling.py)
    "BertModel": BertModel,
    "XLMRobertaModel": XLMRobertaModel,
    "LlamaModel": LlamaModel,
    "MistralModel": MistralModel,
    "Qwen2Model": Qwen2Model,
    # reward models and cross-encoders (shared/models/sequence_classification.py)
    "BertForSequenceClassification": BertForSequenceClassification,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "MistralForSequenceClassification": MistralForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
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
