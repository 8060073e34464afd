"""DeepSeek-V2's MoE MLP: a float32 softmax router over routed experts, plus always-on shared experts.

Routing (the `gate`, held in float32 as transformers keeps it): softmax of the router logits in
float32, then
- topk_method "greedy" (V2-Lite): the top_k experts;
- "group_limited_greedy" (V2): experts fall into n_group groups, a group scores its best expert,
  only the topk_group best groups stay eligible, then the top_k experts among them;
then the weights are renormalised to sum 1 when `norm_topk_prob`, else multiplied by
`routed_scaling_factor` (DeepSeek-V2's rule; every released V2 config has norm_topk_prob false,
and transformers' port always takes the second branch).
The shared experts are one gated MLP of moe_intermediate_size * n_shared_experts, added ungated.
Experts, weight loading and the expert-distribution observer are SparseMoeBlock's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.layers import GatedMLP
from pdserve.shared.models.moe_block import SparseMoeBlock

DEEPSEEK_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
TOPK_METHODS = ("greedy", "group_limited_greedy")


def deepseek_select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    topk_method: str,
    num_groups: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights float32 [T, k], topk_ids int64 [T, k]) from router logits [T, E] (module rules)."""
    scores = torch.softmax(router_logits.float(), dim=-1)
    if topk_method == "group_limited_greedy":
        tokens, experts = scores.shape
        grouped = scores.view(tokens, num_groups, experts // num_groups)
        best_groups = grouped.max(dim=-1).values.topk(topk_group, dim=-1).indices
        keep = torch.zeros(tokens, num_groups, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, best_groups, True)
        scores = (grouped * keep[..., None]).view(tokens, experts)
    weights, ids = scores.topk(top_k, dim=-1)
    if renormalize and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * routed_scaling_factor
    return weights, ids


class DeepseekV2MoeBlock(SparseMoeBlock):
    def __init__(self, config: ModelConfig, layer_id: int):
        c = config.hf_config
        super().__init__(
            config,
            layer_id,
            num_experts=int(c.n_routed_experts),
            top_k=int(c.num_experts_per_tok),
            moe_intermediate_size=int(c.moe_intermediate_size),
            renormalize=bool(getattr(c, "norm_topk_prob", False)),
            expert_names=DEEPSEEK_EXPERT_NAMES,
            weights_in_fp32=True,
        )
        self.topk_method = getattr(c, "topk_method", None) or "greedy"
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"DeepSeek-V2 topk_method {self.topk_method!r} is not supported: {TOPK_METHODS}")
        self.num_groups = int(getattr(c, "n_group", None) or 1)
        self.topk_group = int(getattr(c, "topk_group", None) or self.num_groups)
        self.routed_scaling_factor = float(getattr(c, "routed_scaling_factor", None) or 1.0)
        self.gate = nn.Linear(config.hidden_size, self.experts.num_experts, bias=False, dtype=torch.float32)
        shared = int(getattr(c, "n_shared_experts", None) or 0)
        mlp_bias = bool(getattr(c, "mlp_bias", False))
        self.shared_experts = (
            GatedMLP(config.hidden_size, int(c.moe_intermediate_size) * shared, mlp_bias, config.dtype)
            if shared
            else None
        )

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden.float(), self.gate.weight)
        topk_weights, topk_ids = deepseek_select_experts(
            logits, self.top_k, self.topk_method, self.num_groups, self.topk_group,
            self.renormalize, self.routed_scaling_factor,
        )  # fmt: skip
        if self.observer is not None:
            self.observer.on_select_experts(self.layer_id, topk_ids)
        return topk_weights, topk_ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(hidden)
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out
