"""`/get_weights_by_name` on a tensor-parallel worker: the whole parameter's first rows, gathered.

SGLang's models answer with the first `truncate_size` rows of the parameter on rank 0, gathered
from every rank for the row-parallel o_proj and down_proj; its tests compare that with the Hugging
Face parameter. pdserve gathers every sharded parameter, so the answer is always the first rows
of the whole checkpoint tensor, whatever the split (column-parallel rows, vocabulary rows, KV
heads, row-parallel columns).

    rows = read_weights(runner, "model.layers.0.mlp.down_proj.weight", truncate_size=100)  # rank 0
    follow_weight_read(runner, ReadWeights(...))                                            # follower

Rules:
- a name is looked up on rank 0 first (KeyError: nothing is sent);
- rank 0 sends `ReadWeights` on the step channel; every rank hands over (a collective) the part
  of its slice that lands in the first rows, placed by the rank's ShardRule; rank 0 puts the parts
  where they go in the whole parameter (vocabulary padding dropped, replicated KV heads written by
  each of their ranks alike);
- a name without a rule (norms, replicated tensors, a merged parameter read by the model's own name,
  such as qkv_proj) reads rank 0's values; a per-row fp8 scale follows its weight's rows.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.tensor_weights import parameter_by_name, weights_by_name
from pdserve.shared.engine.tp_steps import ReadWeights
from pdserve.shared.models.fp8_checkpoint import SCALE_SUFFIX
from pdserve.shared.models.loader import meta_model
from pdserve.shared.models.shard_rule import ShardRule

logger = logging.getLogger(__name__)

# (dim, [(start in the whole parameter, this rank's values there)]), or None: rank 0's values
Part = tuple[int, list[tuple[int, torch.Tensor]]] | None


def read_weights(runner: ModelRunner, name: str, truncate_size: int) -> list:
    """Rank 0: the whole parameter's first `truncate_size` rows as float32 lists; KeyError for an
    unknown name."""
    if runner.tp is None or runner.shard_rules is None:
        return weights_by_name(runner.model, name, truncate_size)
    own = parameter_by_name(runner.model, name)  # KeyError before the followers hear of it
    whole_shape = parameter_by_name(meta_model(runner.config, runner.args.quantization), name).shape
    if runner.step_sender is not None:
        runner.step_sender.send_control(ReadWeights(name, truncate_size))
    parts = _gather_parts(runner, name, truncate_size)
    if any(part is None for part in parts):
        return own[:truncate_size].to(device="cpu", dtype=torch.float32).tolist()
    out = torch.zeros((min(truncate_size, whole_shape[0]), *whole_shape[1:]), dtype=torch.float32)
    for part in parts:
        assert part is not None
        dim, pieces = part
        for start, values in pieces:
            room = min(values.shape[dim], out.shape[dim] - start)  # vocabulary padding is dropped
            if room > 0:
                out.narrow(dim, start, room).copy_(values.narrow(dim, 0, room)[: out.shape[0]])
    return out.tolist()


def follow_weight_read(runner: ModelRunner, message: ReadWeights) -> None:
    """A follower's part of `read_weights`."""
    _gather_parts(runner, message.name, message.truncate_size)


def _gather_parts(runner: ModelRunner, name: str, truncate_size: int) -> list[Part]:
    assert runner.tp is not None
    try:
        part = _local_part(runner, name, truncate_size)
    except Exception:  # the ranks must meet in the collective whatever happens: rank 0's values then
        logger.exception("reading this rank's part of %s failed", name)
        part = None
    parts: list[Part] = [None] * runner.tp.size
    dist.all_gather_object(parts, part)
    return parts


def _rule_of(runner: ModelRunner, name: str, local: torch.Tensor) -> ShardRule | None:
    rules = runner.shard_rules or {}
    if name in rules:
        return rules[name]
    if name == "lm_head.weight" and getattr(runner.model, "lm_head", 0) is None:  # tied
        return rules.get("model.embed_tokens.weight")
    weight_rule = rules.get(name.removesuffix(SCALE_SUFFIX)) if name.endswith(SCALE_SUFFIX) else None
    if weight_rule is not None and weight_rule.dim == 0 and local.numel() > 1:  # one scale per row
        return weight_rule
    return None


@torch.no_grad()
def _local_part(runner: ModelRunner, name: str, truncate_size: int) -> Part:
    """This rank's values that land in the whole parameter's first `truncate_size` rows."""
    local = parameter_by_name(runner.model, name)
    rule = _rule_of(runner, name, local)
    if rule is None:
        return None
    local = local.to(device="cpu", dtype=torch.float32)
    pieces: list[tuple[int, torch.Tensor]] = []
    offset = 0
    for start, length in ((rule.start, rule.length), *rule.rest):
        values = local.narrow(rule.dim, offset, length)
        offset += length
        if rule.dim == 0:
            keep = max(0, min(length, truncate_size - start))
            if keep:
                pieces.append((start, values[:keep].clone()))
        else:
            pieces.append((start, values[:truncate_size].clone()))
    return rule.dim, pieces
