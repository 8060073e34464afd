"""DeepSeek-V2 (and V2-Lite): multi-head latent attention and a DeepSeek MoE MLP in Llama's layer shape.

A layer is pre-norm attention then pre-norm MLP, as DecoderLayer runs it; its attention is
MLAttention (mla_attention.py: the compressed KV in a one-plane pool) and its MLP is
- a dense gated MLP of `intermediate_size` for the first `first_k_dense_replace` layers and the
  layers off the `moe_layer_freq` step (layer i is sparse when i >= first_k_dense_replace and
  i % moe_layer_freq == 0, DeepSeek's rule; transformers' config has no moe_layer_freq: 1);
- else DeepseekV2MoeBlock (deepseek_moe.py): routed experts plus shared experts.
Checkpoint names are transformers' (`self_attn.kv_a_proj_with_mqa`, `mlp.shared_experts.*`,
experts per expert or fused, as moe_weights.per_expert_tensors reads them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.deepseek_moe import DEEPSEEK_EXPERT_NAMES, DeepseekV2MoeBlock
from pdserve.shared.models.layers import GatedMLP, RMSNorm
from pdserve.shared.models.llama import DecoderLayer, DecoderModel, LlamaForCausalLM
from pdserve.shared.models.mla_attention import MLAttention
from pdserve.shared.models.moe_weights import per_expert_tensors
from pdserve.shared.models.rope import RotaryEmbedding


def is_moe_layer(hf_config: object, layer_id: int) -> bool:
    routed = getattr(hf_config, "n_routed_experts", None)
    first_dense = int(getattr(hf_config, "first_k_dense_replace", 0) or 0)
    freq = int(getattr(hf_config, "moe_layer_freq", 1) or 1)
    return bool(routed) and layer_id >= first_dense and layer_id % freq == 0


class DeepseekV2DecoderLayer(DecoderLayer):
    """DecoderLayer's forward over MLA and a dense or MoE MLP."""

    def __init__(self, config: ModelConfig, layer_id: int):
        nn.Module.__init__(self)  # not DecoderLayer.__init__: it would build Llama's attention
        c, dtype = config.hf_config, config.dtype
        # DecoderLayer types it Attention; its forward only calls self_attn(hidden, batch, cos_sin)
        self.self_attn = MLAttention(config, layer_id)  # type: ignore[assignment]
        self.mlp: nn.Module = (
            DeepseekV2MoeBlock(config, layer_id)
            if is_moe_layer(c, layer_id)
            else GatedMLP(
                config.hidden_size, config.intermediate_size, bool(getattr(c, "mlp_bias", False)), dtype
            )
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class DeepseekV2DecoderModel(DecoderModel):
    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)  # not DecoderModel.__init__: it would build Llama's layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.rotary_emb = RotaryEmbedding(config.rope)  # over qk_rope_head_dim (the config's head_dim)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """DeepSeek-V2; LlamaForCausalLM's logits, weight loading and buffers."""

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)  # not LlamaForCausalLM.__init__: it would build Llama's tree
        hidden_act = getattr(config.hf_config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"{type(self).__name__}: activation {hidden_act!r} is not supported (silu only)")
        if config.kv_planes != 1:
            raise ValueError(f"{type(self).__name__}: the config has no kv_lora_rank (MLA)")
        self.config = config
        self.model = DeepseekV2DecoderModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype)
        )

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return per_expert_tensors(weights, DEEPSEEK_EXPERT_NAMES)
