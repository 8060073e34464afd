"""The fast path's MoE block: routing in one launch and, for Qwen2-MoE, the shared expert's gate
merged into the router's GEMM and its tail in one launch.

`TritonSparseMoeBlock(block)` stands in for a SparseMoeBlock (exactly that type: DeepSeek-V2's
block routes by groups and scales, and keeps its own routing) whose expert count and top-k the
routing kernel takes (`fits`: up to 256 experts, top-8); shared.models.fast_path swaps it in.
Per layer, the plain block's routing runs the router GEMM, then ~8 small launches (a float32 copy,
softmax, top-k, the renormalisation's sum and division, the ids to int32 and to int64, the weights
to the model's dtype and back to float32), and Qwen2-MoE's shared expert adds its gate's GEMV
(cuBLAS: a dot and a reduce), sigmoid, multiply and add. Here:
- one GEMM of E + 1 output rows, the router's E rows then the shared gate's row (without a shared
  expert, the router's GEMM alone);
- kernels.moe_routing on its first E columns, in place: float32 weights and int32 ids, which is
  what the fused MoE reads, so nothing runs between the two;
- the shared expert, then the experts, whose closing launch (kernels.moe_combine) sums the k
  slots and adds sigmoid(g) * shared from the GEMM's last column (experts without that launch:
  kernels.shared_expert_gate after them).

Rules:
- Results equal the plain block's up to float rounding order: the routing weights are rounded to
  the model's dtype as the plain block casts them (not with `weights_in_fp32`: Mixtral), and the
  tail rounds where `out + sigmoid(g) * shared` does. Among exactly equal router logits the
  kernel picks the lower expert id, where torch.topk's order is unspecified (kernels.moe_routing).
- The merged weight `[E + 1, H]` is one tensor, and the router's and the shared gate's weight
  Parameters become views of its rows: the Parameters stay the checkpoint's targets, so a weight
  load or update (which copies into them in place) writes the merged weight too. It is a plain
  attribute, not a Parameter: checkpoint names, parameter counts and weight bytes do not change.
  Moving the model after the pass (`.to()`) would give the Parameters storage of their own: the
  pass runs where the model serves, once its weights are loaded (as the model runner applies it).
- The replacement holds the original modules and attributes, takes over the block's forward hooks
  (tensor parallelism's all-reduce) and its expert-distribution observer, which gets int64 ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.kernels.custom_ops import add_gated_shared_expert_op, moe_routing_op
from pdserve.kernels.moe_routing import MAX_EXPERTS, MAX_TOP_K
from pdserve.shared.models.moe_block import SparseMoeBlock

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_BLOCK_ATTRS = ("layer_id", "top_k", "renormalize", "weights_in_fp32", "checkpoint_prefix", "observer")


@torch.no_grad()
def merge_gate_rows(gate: nn.Linear, shared_expert_gate: nn.Linear) -> torch.Tensor | None:
    """The two gates' weights as one `[E + 1, H]` tensor whose rows both Parameters then view; None
    (nothing changed) when they cannot share one: a bias, another module type, dtype or device."""
    parts = (gate, shared_expert_gate)
    if any(type(m) is not nn.Linear or m.bias is not None for m in parts):
        return None
    if (
        gate.weight.dtype != shared_expert_gate.weight.dtype
        or gate.weight.device != shared_expert_gate.weight.device
    ):
        return None
    merged = torch.cat([gate.weight, shared_expert_gate.weight])
    num_experts = gate.weight.shape[0]
    gate.weight.data = merged[:num_experts]
    shared_expert_gate.weight.data = merged[num_experts:]
    return merged


class TritonSparseMoeBlock(SparseMoeBlock):
    """SparseMoeBlock through the routing and shared-gate kernels (see the module rules)."""

    def __init__(self, block: SparseMoeBlock):
        nn.Module.__init__(self)  # not SparseMoeBlock.__init__: it would allocate every weight
        self.training = block.training
        for name in _BLOCK_ATTRS:
            setattr(self, name, getattr(block, name))
        self.gate = block.gate
        self.experts = block.experts
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        for hooks in _HOOK_DICTS:
            getattr(self, hooks).update(getattr(block, hooks))
        self.num_experts = block.experts.num_experts
        self.merged_gate: torch.Tensor | None = None
        if self.shared_expert_gate is not None:
            self.merged_gate = merge_gate_rows(self.gate, self.shared_expert_gate)

    @staticmethod
    def fits(block: SparseMoeBlock) -> bool:
        """Whether the routing kernel takes this block's expert count and top-k."""
        return block.experts.num_experts <= MAX_EXPERTS and block.top_k <= MAX_TOP_K

    def _select(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        round_to = None if self.weights_in_fp32 else router_logits.dtype
        topk_weights, topk_ids = moe_routing_op(router_logits, self.top_k, self.renormalize, round_to)
        if self.observer is not None:
            self.observer.on_select_experts(self.layer_id, topk_ids.long())
        return topk_weights, topk_ids

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights [T, k] float32, topk_ids [T, k] int32)."""
        return self._select(self.gate(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None or self.shared_expert_gate is None:
            topk_weights, topk_ids = self.route(hidden)
            return self.experts(hidden, topk_weights, topk_ids)
        if self.merged_gate is not None:
            logits = F.linear(hidden, self.merged_gate)
            router_logits, shared_gate = logits[:, : self.num_experts], logits[:, self.num_experts]
        else:
            router_logits, shared_gate = self.gate(hidden), self.shared_expert_gate(hidden)[:, 0]
        topk_weights, topk_ids = self._select(router_logits)
        shared = self.shared_expert(hidden)
        if self.experts.takes_gated_shared:
            return self.experts(hidden, topk_weights, topk_ids, shared, shared_gate)
        return add_gated_shared_expert_op(self.experts(hidden, topk_weights, topk_ids), shared, shared_gate)
