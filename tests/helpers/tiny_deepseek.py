"""Tiny random DeepSeek-V2 configs (MLA + DeepSeek MoE), made by tiny_models.make_tiny_model.

Both: hidden 64, 4 heads, kv_lora_rank 32, qk_nope 16, qk_rope 8, v_head_dim 12 (!= the q.k head
dim 24), 3 layers of which the first is dense (first_k_dense_replace 1), 8 routed experts of 16
and 2 shared experts, untied lm_head.
- deepseek_v2:      V2-Lite's shape: q_lora_rank None (plain q_proj), greedy top-2, no rope scaling.
- deepseek_v2_yarn: V2's shape: q_lora_rank 24 (q_a_proj, q_a_layernorm, q_b_proj),
                    group_limited_greedy top-3 over 4 groups (2 kept), routed_scaling_factor 1.5,
                    yarn rope (factor 4 over an original context of 32, mscale 1 and mscale_all_dim
                    0.8, so both the cos/sin factor and the softmax scale differ from 1).
"""

from __future__ import annotations

DEEPSEEK_KINDS = ("deepseek_v2", "deepseek_v2_yarn")


def deepseek_config(kind: str, common: dict):  # -> a transformers DeepseekV2Config
    from transformers import DeepseekV2Config

    fields = {
        **common,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "intermediate_size": 96,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
        "architectures": ["DeepseekV2ForCausalLM"],
    }
    if kind == "deepseek_v2":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        fields.update(q_lora_rank=None, topk_method="greedy", num_experts_per_tok=2, rope_parameters=rope)
        return DeepseekV2Config(**fields)
    if kind == "deepseek_v2_yarn":
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "beta_fast": 32,
            "beta_slow": 1,
        }
        fields.update(
            q_lora_rank=24,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            routed_scaling_factor=1.5,
            rope_parameters=rope,
            max_position_embeddings=128,  # 4 x 32, as yarn's factor says
        )
        return DeepseekV2Config(**fields)
    raise ValueError(f"unknown DeepSeek kind {kind!r}; kinds: {DEEPSEEK_KINDS}")
