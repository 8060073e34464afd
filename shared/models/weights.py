"""Copying checkpoint tensors (Hugging Face names) into a model's parameters.

Rules:
- Every parameter answers to its own dotted name, except the rows of a `MergedLinear`, which answer
  to the checkpoint names they replace ("...self_attn.qkv_proj" holds "...self_attn.q_proj.weight",
  "...k_proj.weight", "...v_proj.weight"), and the tensors of a module with
  `named_checkpoint_targets(module_name)`, which names them itself (its submodules included):
  stacked MoE experts hold one checkpoint tensor per expert.
- Shapes must match exactly; dtypes are converted to the parameter's. The one exception: an fp8
  `weight_scale` fills its target whole ([N, 1] per channel as [N]; one per-tensor value
  broadcast over its rows).
- A checkpoint tensor with no target is an error unless the model's `ignore` says it is expected
  (rotary buffers saved by old exporters, lm_head of a tied model); a target that received nothing
  is an error when `strict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pdserve.shared.models.layers import MergedLinear

# Where a checkpoint tensor goes: a parameter and an index into it (None: all of it; a slice of
# rows; an expert, or an expert's rows, of a stacked [E, ...] parameter).
TargetIndex = slice | int | tuple[int, slice] | None
Target = tuple[nn.Parameter, TargetIndex]


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or misshapen tensors."""


def checkpoint_targets(model: nn.Module) -> dict[str, Target]:
    """Checkpoint tensor name -> (parameter, index into it, or None for all of it)."""
    targets: dict[str, Target] = {}
    self_named: list[str] = []  # modules that named their tensors, submodules included
    for module_name, module in model.named_modules():
        if any(module_name.startswith(f"{owner}.") for owner in self_named):
            continue
        named = getattr(module, "named_checkpoint_targets", None)
        if module is not model and callable(named):
            targets.update(named(module_name))
            self_named.append(module_name)
            continue
        for attr, param in module.named_parameters(recurse=False):
            if isinstance(module, MergedLinear):
                parent = module_name.rpartition(".")[0]
                for shard in module.shards:
                    name = f"{parent}.{shard}.{attr}" if parent else f"{shard}.{attr}"
                    targets[name] = (param, module.shard_rows(shard))
            else:
                targets[f"{module_name}.{attr}" if module_name else attr] = (param, None)
    return targets


def scale_as(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """An fp8 scale shaped as its target: one per tensor spread over the rows, or one per row."""
    return tensor.reshape(-1).expand(shape) if tensor.numel() == 1 else tensor.reshape(shape)


def _summarize(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_checkpoint_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    ignore: Callable[[str], bool],
    strict: bool = True,
) -> set[str]:
    """Copies `weights` into `model`; returns the checkpoint names loaded. See the module rules."""
    targets = checkpoint_targets(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        target = targets.get(name)
        if target is None:
            if not ignore(name):
                unexpected.append(name)
            continue
        param, rows = target
        dest = param.data if rows is None else param.data[rows]
        if name.endswith(".weight_scale") and tensor.numel() in (1, dest.numel()):
            tensor = scale_as(tensor, dest.shape)
        if dest.shape != tensor.shape:
            raise WeightLoadError(
                f"tensor {name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded.add(name)
    if unexpected:
        raise WeightLoadError(f"unexpected tensors in checkpoint: {_summarize(unexpected)}")
    missing = set(targets) - loaded
    if strict and missing:
        raise WeightLoadError(f"tensors missing from checkpoint: {_summarize(missing)}")
    return loaded
