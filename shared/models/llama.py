"""The Llama decoder family: Llama 2/3/3.1 (and SmolLM2), Mistral, Qwen2, Qwen3.

One module tree serves all four; subclasses only state what differs (biases, per-head q/k norm).
Parameter names are the Hugging Face checkpoint names, except that q/k/v and gate/up are merged
(`qkv_proj`, `gate_up_proj`) and mapped back on load. Tied models hold no `lm_head`: logits use the
embedding matrix.

Interface the model runner relies on:
- `forward(batch)` -> hidden states [T, hidden] of the batch's new tokens, after the final norm;
- `compute_logits(hidden)` -> [N, vocab] float32;
- `load_weights(weights)` from (checkpoint name, tensor) pairs.

Attention goes through `batch.attn_backend.attend(layer_id, q, k, v, batch, scale, window=...,
softcap=...)` with q/k after rope; these modules know nothing of pages. Each Attention carries its
layer's sliding window and logit cap (None: none); Mistral sets the config's `sliding_window` on
every layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch
from pdserve.shared.models.layers import GatedMLP, MergedLinear, RMSNorm
from pdserve.shared.models.rope import RotaryEmbedding, apply_rotary
from pdserve.shared.models.weights import load_checkpoint_weights


class ApplyRotary(nn.Module):
    """`apply_rotary` as a submodule, so that a pass can swap in a kernel (shared.models.fast_path).

    `rope` is whatever `DecoderModel.rotary_emb` returned; a pass that swaps one swaps both.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, rope)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        # Per-layer attention features; the architectures that have them set them after building.
        self.window: int | None = None
        self.softcap: float | None = None
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        dtype = config.dtype
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, qkv_bias, dtype
        )
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias, dtype=dtype)
        # Qwen3: RMSNorm over each head's vector, before rope.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if qk_norm else None
        self.rotary = ApplyRotary()

    def project_qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D] before rope (views of one projection output)."""
        tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self, hidden: torch.Tensor, batch: ForwardBatch, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(hidden)
        q, k = self.rotary(q, k, cos_sin)
        out = batch.attn_backend.attend(
            self.layer_id, q, k, v, batch, self.scale, window=self.window, softcap=self.softcap
        )
        return self.o_proj(out.reshape(hidden.shape[0], self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        biases: tuple[bool, bool, bool],
        qk_norm: bool,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        qkv_bias, o_bias, mlp_bias = biases
        dtype = config.dtype
        self.self_attn = Attention(config, layer_id, qkv_bias, o_bias, qk_norm)
        if mlp is None:  # the family's gated MLP; MoE families hand in their sparse block
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, mlp_bias, dtype)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm: HF's `model.*` subtree."""

    def __init__(
        self,
        config: ModelConfig,
        biases: tuple[bool, bool, bool],
        qk_norm: bool,
        mlp_for_layer: Callable[[int], nn.Module | None] | None = None,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, biases, qk_norm, mlp_for_layer(i) if mlp_for_layer else None)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.rotary_emb = RotaryEmbedding(config.rope)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)
        cos_sin = self.rotary_emb(batch.positions)  # shared by all layers
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch, cos_sin)
        if residual is None:  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3/3.1, SmolLM2; the base of the family. Subclasses override the class attributes."""

    qk_norm: ClassVar[bool] = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden_act = getattr(config.hf_config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"{type(self).__name__}: activation {hidden_act!r} is not supported (silu only)")
        self.config = config
        self.model = DecoderModel(config, self.biases(config), self.qk_norm, self.mlp_for_layer)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype)
        )

    @classmethod
    def biases(cls, config: ModelConfig) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o_proj bias, MLP bias) as this architecture reads them from the config."""
        attention_bias = bool(getattr(config.hf_config, "attention_bias", False))
        return attention_bias, attention_bias, bool(getattr(config.hf_config, "mlp_bias", False))

    def mlp_for_layer(self, layer_id: int) -> nn.Module | None:
        """The MLP of layer `layer_id` where it is not the gated MLP (MoE families); None here."""
        return None

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def ignore_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors that have no parameter here on purpose."""
        return "rotary_emb." in name or (self.lm_head is None and name == "lm_head.weight")

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor) pairs as this module tree names its tensors (a family
        with other names or fused tensors translates here; weight updates check through it too)."""
        return weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> None:
        load_checkpoint_weights(
            self, self.checkpoint_pairs(weights), self.ignore_checkpoint_tensor, strict=strict
        )

    def reset_buffers(self) -> None:
        """Recomputes non-persistent buffers (after building on the meta device and `to_empty`)."""
        self.model.rotary_emb.reset_buffers()


class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        # As transformers' Mistral: the config's window on every layer; null means none.
        window = getattr(config.hf_config, "sliding_window", None)
        for module in self.modules():
            if isinstance(module, Attention):
                module.window = int(window) if window else None

    @classmethod
    def biases(cls, config: ModelConfig) -> tuple[bool, bool, bool]:
        return False, False, False


def windows_from_layer_types(model: nn.Module, hf_config: object) -> None:
    """The config's `sliding_window` on the layers its `layer_types` marks "sliding_attention"
    (transformers' Qwen2/Qwen3: with `use_sliding_window`, the layers from `max_window_layers` on)."""
    layer_types = getattr(hf_config, "layer_types", None)
    window = getattr(hf_config, "sliding_window", None)
    if not layer_types or not window:
        return
    for module in model.modules():
        if isinstance(module, Attention) and layer_types[module.layer_id] == "sliding_attention":
            module.window = int(window)


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        windows_from_layer_types(self, config.hf_config)

    @classmethod
    def biases(cls, config: ModelConfig) -> tuple[bool, bool, bool]:
        return True, False, False  # q/k/v always carry a bias in Qwen2; o_proj and the MLP never


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        windows_from_layer_types(self, config.hf_config)

    @classmethod
    def biases(cls, config: ModelConfig) -> tuple[bool, bool, bool]:
        attention_bias = bool(getattr(config.hf_config, "attention_bias", False))
        return attention_bias, attention_bias, False
