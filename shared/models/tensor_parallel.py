"""Tensor parallelism as a pass over a plain model (after gpt-fast's `apply_tp`): `shard_model`
swaps a rank's slice in for each full projection of a model built on the meta device, and returns
the rules that slice the full checkpoint's tensors while they load.

Rules:
- The Llama family, Gemma, Phi-3, the MoE families (their blocks: tensor_parallel_moe.py) and
  DeepSeek-V2 (its latent attention: tensor_parallel_mla.py), as `SHARDABLE` names them;
  another architecture with --tp > 1 is refused by name, as are shapes that do not split: query
  heads and the MLP (and expert) widths must divide by the size, and KV heads must divide by it or
  divide it.
- Column-parallel (each rank its output rows): q/k/v split by heads inside the merged qkv
  projection, gate and up each split inside gate_up. Attention then sees num_heads / size query
  heads; with fewer KV heads than ranks each KV head is replicated on size / kv_heads ranks (the
  one its query heads read), as SGLang does.
- Row-parallel, then an all-reduce: o_proj and down_proj (tensor_parallel_layers.py).
- A checkpoint that fuses projections (Phi-3's qkv_proj and gate_up_proj) is cut per part
  (shard_rule.py), so the model's own loading splits the rank's fused slice as it splits a whole one.
- Vocabulary-parallel: the embedding (Gemma's scaled one too) and lm_head (a tied model's logits
  use the embedding slice); the vocabulary is padded with zero rows to a multiple of the size; the
  runner gathers the logits.
- Norms (q/k norms included), rope and biases of row-parallel layers stay whole on every rank.
- fp8 weights (`--quantization fp8` or an fp8 checkpoint): tensor_parallel_fp8.py, fp8_checkpoint.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.gemma import ScaledEmbedding
from pdserve.shared.models.layers import GatedMLP, MergedLinear
from pdserve.shared.models.llama import Attention, LlamaForCausalLM
from pdserve.shared.models.mla_attention import MLAttention
from pdserve.shared.models.moe_block import SparseMoeBlock
from pdserve.shared.models.quantization import fp8_scheme
from pdserve.shared.models.shard_rule import ShardRule, projection_rules
from pdserve.shared.models.tensor_parallel_layers import (
    RowParallelLinear,
    ScaledVocabParallelEmbedding,
    TPRank,
    VocabParallelEmbedding,
)
from pdserve.shared.models.tensor_parallel_mla import shard_mla_attention
from pdserve.shared.models.tensor_parallel_mlp import shard_gated_mlp
from pdserve.shared.models.tensor_parallel_moe import MOE_SHARDABLE, check_moe_widths, shard_moe_block

SHARDABLE = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
    "DeepseekV2ForCausalLM",  # MLA: tensor_parallel_mla.py
    *MOE_SHARDABLE,
)

# fp8 under TP: the Llama family's plain projections (tensor_parallel_fp8.py); experts' per-row
# scales, MLA's projections and Phi-3's fused fp8 checkpoint scales have no per-rank cut yet
FP8_SHARDABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def check_tensor_parallel(config: ModelConfig, tp_size: int, quantization: str | None = None) -> None:
    """ValueError naming what keeps `config` from running on `tp_size` ranks (nothing for 1)."""
    if tp_size == 1:
        return
    arch = config.architecture if config.architectures else config.model_type
    if arch not in SHARDABLE:
        raise ValueError(
            f"--tp {tp_size}: {arch} has no tensor-parallel support yet ({', '.join(SHARDABLE)} only)"
        )
    if quantization not in (None, "fp8"):  # fp8: tensor_parallel_fp8.py
        raise ValueError(f"--tp {tp_size}: quantized weights ({quantization}) are not sharded yet")
    if arch not in FP8_SHARDABLE and fp8_scheme(config.hf_config, quantization) is not None:
        raise ValueError(
            f"--tp {tp_size}: fp8 weights of {arch} are not sharded yet ({', '.join(FP8_SHARDABLE)} only)"
        )
    heads, kv_heads = config.num_attention_heads, config.num_kv_heads
    if heads % tp_size:
        raise ValueError(f"--tp {tp_size}: {heads} attention heads do not split over {tp_size} ranks")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"--tp {tp_size}: {kv_heads} KV heads neither split over nor divide {tp_size} ranks")
    if config.intermediate_size % tp_size:
        raise ValueError(
            f"--tp {tp_size}: MLP width {config.intermediate_size} does not split over {tp_size}"
        )
    check_moe_widths(config, tp_size)


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds (and its KV pool stores): a slice, or one replicated head."""
    return max(1, num_kv_heads // tp_size)


def kv_head_start(rank: TPRank, num_kv_heads: int) -> int:
    """The first KV head of `rank` (with fewer KV heads than ranks: the one its query heads read)."""
    if num_kv_heads >= rank.size:
        return rank.rank * (num_kv_heads // rank.size)
    return rank.rank * num_kv_heads // rank.size


def _shard_attention(name: str, attn: Attention, rank: TPRank) -> dict[str, ShardRule]:
    head_dim, old = attn.head_dim, attn.qkv_proj
    full_q, full_kv = attn.num_heads * head_dim, attn.num_kv_heads * head_dim
    num_heads, num_kv_heads = attn.num_heads // rank.size, kv_heads_per_rank(attn.num_kv_heads, rank.size)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q_start, k_start = rank.rank * q_size, kv_head_start(rank, attn.num_kv_heads) * head_dim
    bias = old.bias is not None
    attn.qkv_proj = MergedLinear(
        old.in_features, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, bias, old.weight.dtype
    )
    o_old = attn.o_proj
    attn.o_proj = RowParallelLinear(
        q_size, o_old.out_features, bias=o_old.bias is not None, dtype=o_old.weight.dtype
    )
    attn.num_heads, attn.num_kv_heads = num_heads, num_kv_heads
    attn.split_sizes = (q_size, kv_size, kv_size)
    # a checkpoint that fuses q, k and v (Phi-3's qkv_proj): the rank's rows of each part
    fused = ShardRule(
        0, q_start, q_size, ((full_q + k_start, kv_size), (full_q + full_kv + k_start, kv_size))
    )
    return {
        **projection_rules(name, ("q_proj",), ShardRule(0, q_start, q_size), bias),
        **projection_rules(name, ("k_proj", "v_proj"), ShardRule(0, k_start, kv_size), bias),
        **projection_rules(name, ("qkv_proj",), fused, bias),
        f"{name}.o_proj.weight": ShardRule(1, q_start, q_size),
    }


def _shard_vocab(model: LlamaForCausalLM, config: ModelConfig, rank: TPRank) -> dict[str, ShardRule]:
    rows = rank.vocab_rows(config.vocab_size)
    rule = ShardRule(0, rank.rank * rows, rows)
    embed = model.model.embed_tokens
    dim, dtype = embed.embedding_dim, embed.weight.dtype
    sliced = (
        ScaledVocabParallelEmbedding(rule.start, rows, dim, embed.scale, dtype=dtype)
        if isinstance(embed, ScaledEmbedding)
        else VocabParallelEmbedding(rule.start, rows, dim, dtype=dtype)
    )
    model.model.add_module("embed_tokens", sliced)
    rules = {"model.embed_tokens.weight": rule}
    if model.lm_head is not None:  # a tied model's logits read the embedding's slice
        model.lm_head = nn.Linear(config.hidden_size, rows, bias=False, dtype=model.lm_head.weight.dtype)
        rules["lm_head.weight"] = rule
    return rules


def shard_model(model: nn.Module, config: ModelConfig, rank: TPRank) -> dict[str, ShardRule]:
    """Makes `model` (just built, on the meta device) `rank`'s slice; returns checkpoint name ->
    the slice of that tensor the rank loads (names absent: the whole tensor)."""
    check_tensor_parallel(config, rank.size)
    if not isinstance(model, LlamaForCausalLM) or type(model).__name__ not in SHARDABLE:
        raise ValueError(f"--tp {rank.size}: {type(model).__name__} has no tensor-parallel support yet")
    device = next(model.parameters()).device
    rules: dict[str, ShardRule] = {}
    moe_blocks: list[str] = []  # their shared experts are sharded with them
    with torch.device(device):
        for name, module in list(model.named_modules()):
            if any(name.startswith(f"{block}.") for block in moe_blocks):
                continue
            if isinstance(module, Attention):
                rules.update(_shard_attention(name, module, rank))
            elif isinstance(module, MLAttention):
                rules.update(shard_mla_attention(name, module, rank))
            elif isinstance(module, GatedMLP):
                rules.update(shard_gated_mlp(name, module, rank, RowParallelLinear))
            elif isinstance(module, SparseMoeBlock):
                rules.update(shard_moe_block(name, module, rank))
                moe_blocks.append(name)
        rules.update(_shard_vocab(model, config, rank))
    return rules


def shard_checkpoint(
    weights: Iterable[tuple[str, torch.Tensor]], rules: dict[str, ShardRule]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's pairs with each tensor a rule names cut to this rank's slice."""
    for name, tensor in weights:
        rule = rules.get(name)
        yield name, tensor if rule is None else rule.apply(tensor)
