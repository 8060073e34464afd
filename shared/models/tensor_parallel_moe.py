"""The MoE families under tensor parallelism (Mixtral, Qwen2-MoE, DeepSeek-V2's MoE layers): a pass
over a `SparseMoeBlock`.

Rules:
- Every rank holds every expert, each with a slice of its intermediate width: the gate and up rows
  of `w13` (column-parallel) and the matching columns of `w2` (row-parallel). The expert math
  (the torch loop or the fused-MoE kernel) runs unchanged on the local [E, 2*I/size, H] and
  [E, H, I/size] stacks and yields a partial sum.
- The router (`gate`, DeepSeek's in float32) and Qwen2-MoE's `shared_expert_gate` stay whole: routing is computed the same
  on every rank, so the expert-distribution record of rank 0 is the worker's.
- The shared expert (DeepSeek: shared experts, one gated MLP) is split like a dense MLP, but its
  down projection keeps its partial sum.
- One all-reduce per layer, over the routed experts' and the shared expert's partial sums together
  (a forward hook on the block), not one per expert.
- Checkpoint tensors are cut in both forms that load (shared.models.moe_weights): one per expert
  under the family's names, and transformers' fused `experts.gate_up_proj` / `experts.down_proj`.
"""

from __future__ import annotations

from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.layers import GatedMLP
from pdserve.shared.models.moe_block import MoEExperts, SparseMoeBlock
from pdserve.shared.models.moe_weights import FUSED_DOWN, FUSED_GATE_UP
from pdserve.shared.models.shard_rule import ShardRule
from pdserve.shared.models.tensor_parallel_layers import TPRank, all_reduce_output
from pdserve.shared.models.tensor_parallel_mlp import shard_gated_mlp

MOE_SHARDABLE = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
# Widths of the MoE families' experts (the dense MLP's `intermediate_size` is checked for all).
_EXPERT_WIDTHS = ("moe_intermediate_size", "shared_expert_intermediate_size")


def check_moe_widths(config: ModelConfig, tp_size: int) -> None:
    """ValueError naming an expert width of `config` that does not split over `tp_size` ranks."""
    for field in _EXPERT_WIDTHS:
        width = int(getattr(config.hf_config, field, 0) or 0)
        if width % tp_size:
            raise ValueError(f"--tp {tp_size}: {field} {width} does not split over {tp_size} ranks")


def _expert_rules(name: str, checkpoint_name: str, experts: MoEExperts, full: int, rank: TPRank):
    width = experts.intermediate_size
    start = rank.rank * width
    rows, cols = ShardRule(0, start, width), ShardRule(1, start, width)
    gate, up, down = experts.names
    rules: dict[str, ShardRule] = {}
    for e in range(experts.num_experts):
        prefix = f"{checkpoint_name}.experts.{e}"
        rules[f"{prefix}.{gate}.weight"] = rows
        rules[f"{prefix}.{up}.weight"] = rows
        rules[f"{prefix}.{down}.weight"] = cols
    # transformers' fused form, always under the layer's `mlp` ([E, 2*I, H] gate then up; [E, H, I])
    rules[f"{name}.experts.{FUSED_GATE_UP}"] = ShardRule(1, start, width, ((full + start, width),))
    rules[f"{name}.experts.{FUSED_DOWN}"] = ShardRule(2, start, width)
    return rules


def shard_moe_block(name: str, block: SparseMoeBlock, rank: TPRank) -> dict[str, ShardRule]:
    """Makes `block` (module name `name`, on the meta device) `rank`'s slice; returns its rules."""
    old = block.experts
    full = old.intermediate_size
    block.experts = MoEExperts(
        old.num_experts, old.w13.shape[2], full // rank.size, old.names, dtype=old.w13.dtype
    )
    checkpoint_name = block.checkpoint_name(name)
    rules = _expert_rules(name, checkpoint_name, block.experts, full, rank)
    for child_name, child in list(
        block.named_children()
    ):  # Qwen2-MoE's shared_expert, DeepSeek's shared_experts
        if isinstance(child, GatedMLP):
            rules.update(shard_gated_mlp(f"{checkpoint_name}.{child_name}", child, rank, nn.Linear))
    block.register_forward_hook(all_reduce_output)
    return rules
