"""BERT-family encoders (BertModel, XLMRobertaModel): bidirectional attention, no KV cache.

Parameter names are the Hugging Face checkpoint names of the bare encoder (`embeddings.*`,
`encoder.layer.N.*`); a checkpoint saved from a task model (`bert.` / `roberta.` prefix) loads too.
The pooler head (`pooler.dense`) is not used: sentence embeddings pool the last hidden states
(shared/models/pooling.py).

Interface the model runner relies on (as the decoders', without logits):
- `forward(batch)` -> last hidden states [T, hidden] of the batch's new tokens;
- `load_weights(weights)`, `reset_buffers()`.
Every request of the batch must bring its whole prompt (prefix 0): attention sees the whole
sequence both ways, so a chunk or a cached prefix could not be computed apart. The engine runs
encoders without chunking and without the prefix cache for that reason. XLM-RoBERTa is the same
code with position ids that start after the padding id (as HF computes them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.weights import load_checkpoint_weights

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
_TASK_PREFIXES = ("bert.", "roberta.")


class EncoderBatch(Protocol):
    """What an encoder reads of the engine's ForwardBatch (models sit below the engine)."""

    input_ids: torch.Tensor  # [T] the batch's tokens, request after request
    positions: torch.Tensor  # [T] each token's position in its request
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig, eps: float):
        super().__init__()
        hf, dtype = config.hf_config, config.dtype
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.position_embeddings = nn.Embedding(hf.max_position_embeddings, config.hidden_size, dtype=dtype)
        self.token_type_embeddings = nn.Embedding(
            getattr(hf, "type_vocab_size", 2), config.hidden_size, dtype=dtype
        )
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor | None = None
    ) -> torch.Tensor:
        # without token types, type 0 for every token: one text per request
        types = (
            self.token_type_embeddings.weight[0]
            if token_types is None
            else self.token_type_embeddings(token_types)
        )
        hidden = self.word_embeddings(input_ids) + types
        return self.LayerNorm(hidden + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, dtype = config.hidden_size, config.dtype
        self.query = nn.Linear(h, h, dtype=dtype)
        self.key = nn.Linear(h, h, dtype=dtype)
        self.value = nn.Linear(h, h, dtype=dtype)


class BertDenseNorm(nn.Module):
    """dense, then LayerNorm over dense(x) + residual (HF's BertSelfOutput and BertOutput)."""

    def __init__(self, in_features: int, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden, dtype=dtype)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig, eps: float):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertDenseNorm(config.hidden_size, config.hidden_size, eps, config.dtype)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads

    def forward(self, hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        t = hidden.shape[0]
        q = self.self.query(hidden).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.self.key(hidden).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        v = self.self.value(hidden).view(t, self.num_heads, self.head_dim).transpose(0, 1)
        out = torch.empty_like(q)
        for start, end in spans:  # each request attends over itself only, both ways
            out[:, start:end] = F.scaled_dot_product_attention(
                q[:, start:end], k[:, start:end], v[:, start:end]
            )
        return self.output(out.transpose(0, 1).reshape(t, -1), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size, dtype=config.dtype)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, eps) for _ in range(config.num_layers))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig, eps: float):
        super().__init__()
        act = getattr(config.hf_config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"BERT activation {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[act]
        self.attention = BertAttention(config, eps)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseNorm(config.intermediate_size, config.hidden_size, eps, config.dtype)

    def forward(self, hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        hidden = self.attention(hidden, spans)
        return self.output(self.act(self.intermediate.dense(hidden)), hidden)


class BertModel(nn.Module):
    """The bare BERT encoder (HF `BertModel` without its pooler)."""

    is_encoder: ClassVar[bool] = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        eps = float(getattr(config.hf_config, "layer_norm_eps", 1e-12))
        self.embeddings = BertEmbeddings(config, eps)
        self.encoder = BertEncoder(config, eps)

    def position_ids(self, batch: EncoderBatch) -> torch.Tensor:
        return batch.positions

    def token_types(self, batch: EncoderBatch) -> torch.Tensor | None:
        """Each token's segment (None: all 0); a cross-encoder's pairs have two."""
        return None

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        if any(batch.prefix_lens_cpu):
            raise ValueError("an encoder computes whole prompts: no request may bring a cached prefix")
        spans, start = [], 0
        for n in batch.extend_lens_cpu:
            spans.append((start, start + n))
            start += n
        hidden = self.embeddings(batch.input_ids, self.position_ids(batch), self.token_types(batch))
        for layer in self.encoder.layer:
            hidden = layer(hidden, spans)
        return hidden

    def ignore_checkpoint_tensor(self, name: str) -> bool:
        return name.startswith("pooler.") or name.endswith(("position_ids", "token_type_ids"))

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's pairs under this tree's names (a task model's `bert.`/`roberta.` dropped)."""
        return _strip_task_prefix(weights)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> None:
        load_checkpoint_weights(self, self.checkpoint_pairs(weights), self.ignore_checkpoint_tensor, strict)

    def reset_buffers(self) -> None:
        """No non-persistent buffers (the loader calls it on every model)."""


class XLMRobertaModel(BertModel):
    """RoBERTa's positions: padding_idx + 1 + the count of non-padding tokens before and at each."""

    def position_ids(self, batch: EncoderBatch) -> torch.Tensor:
        pad = int(getattr(self.config.hf_config, "pad_token_id", 1) or 0)
        not_pad = (batch.input_ids != pad).long()
        positions = torch.empty_like(batch.input_ids)
        start = 0
        for n in batch.extend_lens_cpu:
            mask = not_pad[start : start + n]
            positions[start : start + n] = torch.cumsum(mask, 0) * mask + pad
            start += n
        return positions


def _strip_task_prefix(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        for prefix in _TASK_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        yield name, tensor
