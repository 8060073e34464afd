"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): Qwen2's attention with a sparse MoE MLP and a gated shared expert.

Layer i is sparse when it is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0
(and `num_experts` > 0); the other layers keep a dense gated MLP of `intermediate_size`. A sparse
layer routes each token to `num_experts_per_tok` of `num_experts` experts of
`moe_intermediate_size`, renormalised when `norm_topk_prob`, plus the shared expert of
`shared_expert_intermediate_size` scaled by sigmoid(shared_expert_gate(x)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdserve.shared.models.llama import Qwen2ForCausalLM
from pdserve.shared.models.moe_block import SparseMoeBlock
from pdserve.shared.models.moe_weights import per_expert_tensors

QWEN2_MOE_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def is_sparse_layer(hf_config, layer_id: int) -> bool:
    """HF's rule for which Qwen2-MoE layers hold experts."""
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    mlp_only = set(getattr(hf_config, "mlp_only_layers", None) or [])
    num_experts = int(getattr(hf_config, "num_experts", 0) or 0)
    return layer_id not in mlp_only and num_experts > 0 and (layer_id + 1) % step == 0


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    def mlp_for_layer(self, layer_id: int) -> nn.Module | None:
        c = self.config.hf_config
        if not is_sparse_layer(c, layer_id):
            return None
        return SparseMoeBlock(
            self.config,
            layer_id,
            num_experts=int(c.num_experts),
            top_k=int(c.num_experts_per_tok),
            moe_intermediate_size=int(c.moe_intermediate_size),
            renormalize=bool(getattr(c, "norm_topk_prob", False)),
            expert_names=QWEN2_MOE_EXPERT_NAMES,
            shared_intermediate_size=int(getattr(c, "shared_expert_intermediate_size", 0) or 0) or None,
        )

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return per_expert_tensors(weights, QWEN2_MOE_EXPERT_NAMES)
