"""Tiny random sequence-classification checkpoints (float32, fixed seed) for parity tests.

    make_tiny_classifier("bert", dir, num_labels=1)      # HF BertForSequenceClassification (cross-encoder)
    make_tiny_classifier("xlm-roberta", dir)              # XLMRobertaForSequenceClassification (bge-reranker's)
    make_tiny_classifier("llama", dir, num_labels=1)     # LlamaForSequenceClassification (Skywork-Reward's)
    make_tiny_classifier("qwen2", dir, num_labels=3)

Every weight, bias and norm is random (std 0.1; norms 1 + noise), as in tiny_models.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_embedding_models import tiny_embedding_config
from tests.helpers.tiny_models import WEIGHT_STD, tiny_config

CLASSIFIER_KINDS = ("bert", "xlm-roberta", "llama", "qwen2")
_SEED = 8765
_ARCHITECTURES = {
    "bert": "BertForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}


def tiny_classifier_config(kind: str, num_labels: int, vocab_size: int | None = None):
    config = tiny_embedding_config(kind) if kind in ("bert", "xlm-roberta") else tiny_config(kind)
    if vocab_size is not None:  # to match a real tokenizer's vocabulary
        config.vocab_size = vocab_size
    config.architectures = [_ARCHITECTURES[kind]]
    config.num_labels = num_labels
    config.id2label = {i: f"class_{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    if kind in ("llama", "qwen2"):
        config.pad_token_id = config.vocab_size - 1  # a pad id no test prompt holds
    return config


@torch.no_grad()
def make_tiny_classifier(kind: str, dir: Path, num_labels: int = 1, vocab_size: int | None = None) -> Path:
    """Writes the tiny `kind` classifier (weights and config.json) into `dir`; returns `dir`."""
    from transformers import AutoModelForSequenceClassification

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = tiny_classifier_config(kind, num_labels, vocab_size)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(_SEED)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * WEIGHT_STD
        is_norm = name.endswith(("norm.weight", "LayerNorm.weight"))
        param.copy_(1.0 + noise if is_norm else noise)
    model.save_pretrained(str(dir), safe_serialization=True)
    return dir
