"""Sequence-classification heads: models that score a prompt instead of generating from it.

- Cross-encoders (`BertForSequenceClassification`, `XLMRobertaForSequenceClassification`: rerankers
  such as bge-reranker-v2-m3) read a (query, document) pair as one prompt and score its first
  token: BERT through its pooler (dense + tanh) and classifier, XLM-RoBERTa through its classifier's
  dense + tanh + out_proj. A single-label cross-encoder's score goes through a sigmoid, as
  sentence-transformers' CrossEncoder, SGLang and vLLM give it; several labels stay logits.
- Reward models (`LlamaForSequenceClassification`, Mistral's, Qwen2's: Skywork-Reward) score the
  last token of the prompt with `score` (no bias) and return the raw logits.

The engine runs them as embedding models (shared/engine/embedding.py): it pools each finished
prompt (the first token for encoders, the last for decoders, never normalized; pooling.py) and
hands the pooled rows to `score_pooled`, whose float32 [N, num_labels] is the request's answer.

BERT pairs need token types: a pair reads `[CLS] query [SEP] document [SEP]`, so every token after
the first occurrence of the prompt's final token (its [SEP]) is segment 1. A single text ends at
its first [SEP] and stays segment 0. XLM-RoBERTa has one segment and ignores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pdserve.shared.models.bert import BertModel, EncoderBatch, XLMRobertaModel
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from pdserve.shared.models.pooling import is_classifier, is_cross_encoder


def num_labels(config: ModelConfig) -> int:
    return len(label_names(config.hf_config))


def label_names(hf_config: object) -> list[str]:
    """The labels by index (`id2label`), LABEL_i where the config names none."""
    labels = getattr(hf_config, "id2label", None) or {}
    count = int(getattr(hf_config, "num_labels", 0) or len(labels) or 1)
    by_index = {int(k): str(v) for k, v in labels.items()}
    return [by_index.get(i, f"LABEL_{i}") for i in range(count)]


def classifier_facts(hf_config: object, architectures: list[str]) -> dict[str, object]:
    """What a worker's ServerInfo says of a classifier: its labels, and whether it scores text pairs."""
    if not is_classifier(architectures):
        return {"labels": [], "cross_encoder": False}
    return {"labels": label_names(hf_config), "cross_encoder": is_cross_encoder(architectures)}


def _cross_encoder_activation(scores: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(scores) if scores.shape[-1] == 1 else scores


class BertPooler(nn.Module):
    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, dtype=dtype)


class BertForSequenceClassification(BertModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        hidden, dtype = config.hidden_size, config.dtype
        self.pooler = BertPooler(hidden, dtype)
        self.classifier = nn.Linear(hidden, num_labels(config), dtype=dtype)

    def token_types(self, batch: EncoderBatch) -> torch.Tensor | None:
        if int(getattr(self.config.hf_config, "type_vocab_size", 2)) < 2:
            return None
        types = torch.zeros_like(batch.input_ids)
        start = 0
        for n in batch.extend_lens_cpu:
            ids = batch.input_ids[start : start + n]
            first_sep = int(torch.nonzero(ids == ids[-1])[0].item())
            types[start + first_sep + 1 : start + n] = 1
            start += n
        return types

    def ignore_checkpoint_tensor(self, name: str) -> bool:
        return name.endswith(("position_ids", "token_type_ids"))

    def score_pooled(self, first_tokens: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler.dense(first_tokens.to(self.classifier.weight.dtype)))
        return _cross_encoder_activation(self.classifier(pooled).float())


class RobertaClassificationHead(nn.Module):
    def __init__(self, hidden: int, labels: int, dtype: torch.dtype):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, dtype=dtype)
        self.out_proj = nn.Linear(hidden, labels, dtype=dtype)

    def forward(self, first_tokens: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(first_tokens)))


class XLMRobertaForSequenceClassification(XLMRobertaModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.classifier = RobertaClassificationHead(config.hidden_size, num_labels(config), config.dtype)

    def score_pooled(self, first_tokens: torch.Tensor) -> torch.Tensor:
        head = self.classifier(first_tokens.to(self.classifier.dense.weight.dtype))
        return _cross_encoder_activation(head.float())


def _decoder_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint names of a reward model: the decoder under `model.` (added where a checkpoint
    saved the bare decoder), the head as `score.weight`."""
    for name, tensor in weights:
        bare = not name.startswith(("model.", "score.")) and name != "lm_head.weight"
        yield (f"model.{name}" if bare else name), tensor


class _RewardHead:
    """Mixed into a causal-LM class: the LM head gives way to `score` [num_labels, hidden]."""

    lm_head: nn.Linear | None
    score: nn.Linear

    def use_score_head(self, config: ModelConfig) -> None:
        self.lm_head = None
        self.score = nn.Linear(config.hidden_size, num_labels(config), bias=False, dtype=config.dtype)

    def score_pooled(self, last_tokens: torch.Tensor) -> torch.Tensor:
        return self.score(last_tokens.to(self.score.weight.dtype)).float()

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return _decoder_names(weights)


class LlamaForSequenceClassification(_RewardHead, LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.use_score_head(config)


class MistralForSequenceClassification(_RewardHead, MistralForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.use_score_head(config)


class Qwen2ForSequenceClassification(_RewardHead, Qwen2ForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.use_score_head(config)
