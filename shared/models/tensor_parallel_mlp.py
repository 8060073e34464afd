"""A rank's slice of a gated MLP (gate and up column-parallel, down row-parallel), for the dense
layers and the MoE families' shared experts alike.

The down projection's partial products still need a sum over ranks: a dense layer's
`RowParallelLinear` all-reduces them itself; a shared expert keeps a plain `nn.Linear` and its
partial sum joins the routed experts' before the MoE block's one all-reduce
(shared.models.tensor_parallel_moe).
"""

from __future__ import annotations

from torch import nn

from pdserve.shared.models.layers import GatedMLP, MergedLinear
from pdserve.shared.models.shard_rule import ShardRule, projection_rules
from pdserve.shared.models.tensor_parallel_layers import TPRank


def shard_gated_mlp(
    name: str, mlp: GatedMLP, rank: TPRank, down_class: type[nn.Linear]
) -> dict[str, ShardRule]:
    """Makes `mlp` (checkpoint name `name`) `rank`'s slice; its down projection a `down_class`.
    A checkpoint that fuses gate and up (`gate_up_proj`, Phi-3) is cut per part."""
    full = mlp.intermediate_size
    width = full // rank.size
    start = rank.rank * width
    old, down = mlp.gate_up_proj, mlp.down_proj
    bias = old.bias is not None
    mlp.intermediate_size = width
    mlp.gate_up_proj = MergedLinear(
        old.in_features, {"gate_proj": width, "up_proj": width}, bias, old.weight.dtype
    )
    mlp.down_proj = down_class(width, down.out_features, bias=down.bias is not None, dtype=down.weight.dtype)
    rule = ShardRule(0, start, width)
    return {
        **projection_rules(name, ("gate_proj", "up_proj"), rule, bias),
        **projection_rules(
            name, ("gate_up_proj",), ShardRule(0, start, width, ((full + start, width),)), bias
        ),
        f"{name}.down_proj.weight": ShardRule(1, start, width),
    }
