"""The sparse mixture-of-experts MLP: a router, top-k experts, an optional gated shared expert.

    block = SparseMoeBlock(config, layer_id, top_k=2, renormalize=True, shared_intermediate_size=None)
    out = block(hidden)                     # [T, H] -> [T, H]

Rules:
- Routing follows Hugging Face: softmax over the router logits in float32, top-k, renormalised to
  sum 1 when `renormalize` (Mixtral always, Qwen2-MoE per `norm_topk_prob`); the weights are then
  cast to `weights_dtype` (Qwen2-MoE: the logits' dtype; Mixtral keeps float32, as HF does).
- Expert weights are stacked per layer: `w13` [E, 2*I, H] (gate rows, then up rows) and `w2`
  [E, H, I]. All expert math goes through `MoEExperts.forward(hidden, topk_weights, topk_ids)`,
  the seam where a fused kernel with this layout replaces the torch loop on CUDA.
- The torch loop runs only the experts that received tokens; while a CUDA graph is being
  captured (no host sync allowed) it runs every expert with zero weights for tokens not routed
  to it, which gives the same result. On CUDA the fast path (fast_path.py) replaces the loop by
  the fused-MoE kernel, which needs neither.
- `observer`, when set (expert-distribution recording), sees every layer's `topk_ids`; it must be
  capturable in a CUDA graph (device ops only).
- Checkpoint names: the block answers for its own tensors (`named_checkpoint_targets`), so that
  per-expert checkpoint tensors land in their rows of `w13`/`w2`, under the family's names.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels.fused_moe import select_experts as select_top_experts
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.layers import GatedMLP
from pdserve.shared.models.weights import Target, checkpoint_targets


class ExpertRoutingObserver(Protocol):
    """Sees the experts chosen in each MoE layer (device ops only: it runs inside CUDA graphs);
    topk_ids [T, k] int64."""

    def on_select_experts(self, layer_id: int, topk_ids: torch.Tensor) -> None: ...


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] in weights_dtype, topk_ids [T, k] int64) from router logits [T, E]."""
    weights, ids = select_top_experts(router_logits, top_k, renormalize)
    return weights.to(weights_dtype), ids.long()


class MoEExperts(nn.Module):
    """E gated experts, stacked: `w13` [E, 2*I, H] (gate then up), `w2` [E, H, I].

    `names` are the checkpoint's per-expert module names for (gate, up, down): Qwen2-MoE's
    ("gate_proj", "up_proj", "down_proj"), Mixtral's ("w1", "w3", "w2").
    """

    # whether forward also takes (shared, shared_gate) and adds sigmoid(gate) * shared itself
    takes_gated_shared = False

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        names: tuple[str, str, str],
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.names = names
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype))

    def expert_targets(self, prefix: str) -> dict[str, Target]:
        """Per-expert checkpoint names under `prefix` ("...experts") -> rows of w13 / w2."""
        gate, up, down = self.names
        size = self.intermediate_size
        targets: dict[str, Target] = {}
        for e in range(self.num_experts):
            targets[f"{prefix}.{e}.{gate}.weight"] = (self.w13, (e, slice(0, size)))
            targets[f"{prefix}.{e}.{up}.weight"] = (self.w13, (e, slice(size, 2 * size)))
            targets[f"{prefix}.{e}.{down}.weight"] = (self.w2, e)
        return targets

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[e])

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]), in hidden's dtype."""
        out = torch.zeros_like(hidden)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            dense = torch.zeros(
                hidden.shape[0], self.num_experts, dtype=topk_weights.dtype, device=hidden.device
            )
            dense.scatter_(1, topk_ids.long(), topk_weights)  # int32 ids from the fast path's routing
            for e in range(self.num_experts):
                out += (self._expert(e, hidden) * dense[:, e : e + 1]).to(out.dtype)
            return out
        for e in torch.unique(topk_ids).tolist():
            tokens, slot = torch.where(topk_ids == e)
            expert_out = self._expert(e, hidden[tokens]) * topk_weights[tokens, slot, None]
            out.index_add_(0, tokens, expert_out.to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Router (`gate`), experts, and Qwen2-MoE's shared expert scaled by sigmoid(shared_expert_gate(x)).

    `checkpoint_prefix`: the module name the checkpoint uses for this block in its layer when it
    is not the attribute's ("block_sparse_moe" for Mixtral; None keeps "mlp").
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        num_experts: int,
        top_k: int,
        moe_intermediate_size: int,
        renormalize: bool,
        expert_names: tuple[str, str, str],
        shared_intermediate_size: int | None = None,
        weights_in_fp32: bool = False,
        checkpoint_prefix: str | None = None,
    ):
        super().__init__()
        dtype = config.dtype
        self.layer_id = layer_id
        self.top_k = top_k
        self.renormalize = renormalize
        self.weights_in_fp32 = weights_in_fp32
        self.checkpoint_prefix = checkpoint_prefix
        self.observer: ExpertRoutingObserver | None = None
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts = MoEExperts(num_experts, config.hidden_size, moe_intermediate_size, expert_names, dtype)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(config.hidden_size, shared_intermediate_size, False, dtype)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, dtype=dtype)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(hidden)
        weights_dtype = torch.float32 if self.weights_in_fp32 else logits.dtype
        topk_weights, topk_ids = select_experts(logits, self.top_k, self.renormalize, weights_dtype)
        if self.observer is not None:
            self.observer.on_select_experts(self.layer_id, topk_ids)
        return topk_weights, topk_ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(hidden)
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return out

    def checkpoint_name(self, module_name: str) -> str:
        """The checkpoint's name of this block, whose module name is `module_name`."""
        if self.checkpoint_prefix is None:
            return module_name
        parent = module_name.rpartition(".")[0]
        return f"{parent}.{self.checkpoint_prefix}" if parent else self.checkpoint_prefix

    def named_checkpoint_targets(self, module_name: str) -> dict[str, Target]:
        """Checkpoint names of this block's tensors (called with the block's own module name)."""
        prefix = self.checkpoint_name(module_name)
        targets = self.experts.expert_targets(f"{prefix}.experts")
        for child_name, child in self.named_children():
            if child is not self.experts:
                targets.update(
                    {f"{prefix}.{child_name}.{k}": t for k, t in checkpoint_targets(child).items()}
                )
        return targets
