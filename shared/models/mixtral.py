"""Mixtral: Mistral's attention with a sparse MoE MLP (top `num_experts_per_tok` of
`num_local_experts`, always renormalised, no shared expert).

The checkpoint calls the block `block_sparse_moe` and its experts' projections w1 (gate), w3
(up) and w2 (down); the layer holds it as `mlp`. Routing weights stay float32, as in HF.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pdserve.shared.models.llama import MistralForCausalLM
from pdserve.shared.models.moe_block import SparseMoeBlock
from pdserve.shared.models.moe_weights import per_expert_tensors

MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")
MIXTRAL_BLOCK_NAME = "block_sparse_moe"


class MixtralForCausalLM(MistralForCausalLM):
    def mlp_for_layer(self, layer_id: int) -> nn.Module | None:
        c = self.config.hf_config
        return SparseMoeBlock(
            self.config,
            layer_id,
            num_experts=int(c.num_local_experts),
            top_k=int(c.num_experts_per_tok),
            moe_intermediate_size=int(c.intermediate_size),
            renormalize=True,
            expert_names=MIXTRAL_EXPERT_NAMES,
            weights_in_fp32=True,
            checkpoint_prefix=MIXTRAL_BLOCK_NAME,
        )

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return per_expert_tensors(weights, MIXTRAL_EXPERT_NAMES, MIXTRAL_BLOCK_NAME)
