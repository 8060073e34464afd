"""The bare decoders of embedding checkpoints (HF `LlamaModel`, `MistralModel`, `Qwen2Model`:
e5-mistral, gte-Qwen2): the family's module tree without the language-model head.

Their checkpoints name tensors without the `model.` prefix of the causal-LM checkpoints
(`layers.0.self_attn.q_proj.weight`); both spellings load. An `lm_head.weight` that a converted
checkpoint still carries is ignored: an embedding model computes no logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


def _with_model_prefix(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        bare = not name.startswith("model.") and name != "lm_head.weight"
        yield (f"model.{name}" if bare else name), tensor


class _BareDecoder:
    """Mixed into a causal-LM class: no lm_head, checkpoint names with or without `model.`."""

    lm_head: nn.Linear | None

    def drop_lm_head(self) -> None:
        self.lm_head = None

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return _with_model_prefix(weights)


class LlamaModel(_BareDecoder, LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.drop_lm_head()


class MistralModel(_BareDecoder, MistralForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.drop_lm_head()


class Qwen2Model(_BareDecoder, Qwen2ForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.drop_lm_head()
