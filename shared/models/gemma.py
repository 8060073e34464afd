"""Gemma and Gemma 2: the Llama layout with Gemma's norm, activation, embedding scale and caps.

What differs from shared.models.llama (whose Attention and forward passes these reuse):
- RMSNorm scales by (1 + weight), in float32 (`GemmaRMSNorm`);
- the MLP is GeGLU: down(gelu_tanh(gate(x)) * up(x)) (`GeluGatedMLP`);
- embeddings are multiplied by sqrt(hidden_size) rounded to the model dtype, as transformers does;
- head_dim comes from the config (ModelConfig reads it); embeddings are tied unless the config says not.
Gemma 2 adds: post-attention and pre/post feed-forward norms (four per layer), the attention scale
`query_pre_attn_scalar ** -0.5`, `attn_logit_softcapping` on attention scores,
`final_logit_softcapping` on the logits, and the sliding window on the layers that the config's
`layer_types` marks "sliding_attention".

The norm and MLP are subclasses of llama's, not the same types: the CUDA fast path
(shared.models.fast_path, which swaps exact types) gives them kernels of their own.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch
from pdserve.shared.models.layers import GatedMLP, RMSNorm
from pdserve.shared.models.llama import (
    Attention,
    DecoderLayer,
    DecoderModel,
    LlamaForCausalLM,
    windows_from_layer_types,
)
from pdserve.shared.models.rope import RotaryEmbedding

_GELU_TANH = ("gelu_pytorch_tanh", "gelu")  # transformers maps Gemma's legacy "gelu" to the tanh form


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose scale is (1 + weight), all in float32, then cast back (transformers' Gemma)."""

    neutral_weight: ClassVar[float] = 0.0  # the weight of a scale of 1 (dummy weights use it)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GeluGatedMLP(GatedMLP):
    """down(gelu_tanh(gate(x)) * up(x)), gate and up merged as in GatedMLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class ScaledEmbedding(nn.Embedding):
    """Embedding times sqrt(embedding_dim), that factor first rounded to the weight dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        # On the CPU explicitly: models are built under a meta-device context.
        self.scale = float(torch.tensor(embedding_dim**0.5, device="cpu").to(dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.scale


class GemmaDecoderLayer(DecoderLayer):
    """Llama's layer (and forward) with Gemma's norms and GeGLU."""

    def __init__(self, config: ModelConfig, layer_id: int):
        nn.Module.__init__(self)  # not DecoderLayer.__init__: it would build Llama's norms and MLP
        bias = bool(getattr(config.hf_config, "attention_bias", False))
        dtype, eps = config.dtype, config.rms_norm_eps
        self.self_attn = Attention(config, layer_id, bias, bias, qk_norm=False)
        self.mlp = GeluGatedMLP(config.hidden_size, config.intermediate_size, False, dtype)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """Gemma's layer with norms after attention and around the MLP, each before its residual add."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        hf = config.hf_config
        dtype, eps = config.dtype, config.rms_norm_eps
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps, dtype)
        attn = self.self_attn
        attn.scale = float(hf.query_pre_attn_scalar) ** -0.5
        attn.softcap = getattr(hf, "attn_logit_softcapping", None)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is hidden + residual, as in DecoderLayer, so the fused add-and-norm
        # form serves the pre-norms; before the first layer it is hidden alone (x + 0 is exact).
        if residual is None:
            residual = torch.zeros_like(hidden)
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, batch, cos_sin))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaDecoderModel(DecoderModel):
    """Scaled embedding, Gemma layers, Gemma's final norm; DecoderModel's forward."""

    def __init__(self, config: ModelConfig, layer_class: type[GemmaDecoderLayer]):
        nn.Module.__init__(self)  # not DecoderModel.__init__: it would build Llama's layers
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, config.dtype)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.rotary_emb = RotaryEmbedding(config.rope)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma; LlamaForCausalLM's logits, weight loading and buffers."""

    layer_class: type[GemmaDecoderLayer] = GemmaDecoderLayer
    activation_key = "hidden_act"

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)  # not LlamaForCausalLM.__init__: it would build Llama's tree
        activation = getattr(config.hf_config, self.activation_key, "gelu_pytorch_tanh")
        if activation not in _GELU_TANH:
            raise ValueError(f"{type(self).__name__}: activation {activation!r} is not supported")
        self.config = config
        self.model = GemmaDecoderModel(config, self.layer_class)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype)
        )


class Gemma2ForCausalLM(GemmaForCausalLM):
    """Gemma 2: four norms per layer, attention and final logit soft-capping, alternating windows."""

    layer_class = Gemma2DecoderLayer
    activation_key = "hidden_activation"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        windows_from_layer_types(self, config.hf_config)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = getattr(self.config.hf_config, "final_logit_softcapping", None)
        return logits if cap is None else cap * torch.tanh(logits / cap)
