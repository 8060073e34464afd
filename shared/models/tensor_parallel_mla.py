"""DeepSeek-V2's multi-head latent attention under tensor parallelism: a pass over an `MLAttention`.

Rules:
- Query heads split: each rank holds its heads' rows of q_proj (or q_b_proj; the low-rank q_a_proj
  and its norm stay whole), and the same heads' rows of kv_b_proj, so the absorbed per-head weights
  W_UK and W_UV it derives are its heads' only.
- The compressed KV (kv_a_proj_with_mqa, kv_a_layernorm: the latent c_kv and the shared k_pe) is
  per token, not per head: every rank computes and stores all of it. Its pool holds the one latent
  "KV head" whole (`kv_heads_per_rank(1, size)` is 1), with the same page ids on every rank.
- o_proj is row-parallel over the rank's heads' value columns, then all-reduced.
"""

from __future__ import annotations

from torch import nn

from pdserve.shared.models.mla_attention import MLAttention
from pdserve.shared.models.shard_rule import ShardRule
from pdserve.shared.models.tensor_parallel_layers import RowParallelLinear, TPRank


def _rows_of_heads(
    linear: nn.Linear, heads: int, rows_per_head: int, rank: TPRank
) -> tuple[nn.Linear, ShardRule]:
    """A bias-free linear holding `heads` heads' rows of `linear`, and the rule that cuts them."""
    length = heads * rows_per_head
    local = nn.Linear(linear.in_features, length, bias=False, dtype=linear.weight.dtype)
    return local, ShardRule(0, rank.rank * length, length)


def shard_mla_attention(name: str, attn: MLAttention, rank: TPRank) -> dict[str, ShardRule]:
    """Makes `attn` (module name `name`, on the meta device) `rank`'s heads; returns its rules."""
    heads = attn.num_heads // rank.size
    qk_dim = attn.nope_dim + attn.rope_dim
    rules: dict[str, ShardRule] = {}
    q_name = "q_proj" if attn.q_proj is not None else "q_b_proj"
    local_q, rules[f"{name}.{q_name}.weight"] = _rows_of_heads(getattr(attn, q_name), heads, qk_dim, rank)
    setattr(attn, q_name, local_q)
    attn.kv_b_proj, rules[f"{name}.kv_b_proj.weight"] = _rows_of_heads(
        attn.kv_b_proj, heads, attn.nope_dim + attn.v_head_dim, rank
    )
    values = heads * attn.v_head_dim
    o_old = attn.o_proj
    attn.o_proj = RowParallelLinear(
        values, o_old.out_features, bias=o_old.bias is not None, dtype=o_old.weight.dtype
    )
    rules[f"{name}.o_proj.weight"] = ShardRule(1, rank.rank * values, values)
    attn.num_heads = heads
    return rules
