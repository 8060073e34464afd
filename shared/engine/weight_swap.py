"""Replacing a live model's weights from a checkpoint on disk (`/update_weights_from_disk`).

Two steps, so a bad checkpoint never touches the served weights:
1. `check_weights` resolves the path and reads only the checkpoint's headers: same architecture,
   every checkpoint tensor has a parameter of exactly its shape, every parameter gets a tensor.
   It reads parameter shapes, never their values, so it may run in another thread while the
   engine keeps serving (resolving a hub id may take long: nothing waits on it).
2. `apply_weights` copies the tensors in. Only an idle engine may call it (no forward pass reads
   half-old, half-new weights). If reading fails half-way (a file changed or vanished after the
   check), the caller restores its previous weights (`restore_weights`); the message then says so.

On a tensor-parallel rank the check compares the whole checkpoint with the whole model (built on
the meta device), and the copy and the restore take the rank's `shard_rules`
(loader.shard_rules_of): each tensor is cut as at load.

Messages follow SGLang: a path that resolves to nothing gives exactly
"Failed to get weights iterator: <path> (repository not found)."; a checkpoint that does not fit
gives "Failed to update weights: <what does not fit>."; success is "Succeeded to update model weights.".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.shared.args import EngineArgs
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import init_dummy_weights, iter_weights, safetensors_files
from pdserve.shared.models.resolver import ModelNotFoundError, resolve_model
from pdserve.shared.models.tensor_parallel import ShardRule, shard_checkpoint
from pdserve.shared.models.weights import WeightLoadError, checkpoint_targets

UPDATE_OK = "Succeeded to update model weights."
UPDATE_LOAD_FORMATS = (None, "auto", "safetensors")


class WeightsUpdateError(Exception):
    """The update cannot happen; `str()` is the message for the client."""


@dataclass(frozen=True)
class CheckedWeights:
    """A checkpoint that fits the live model, ready for `apply_weights`."""

    reported_path: str  # what the client asked for (shown by /get_model_info afterwards)
    local_dir: Path
    load_format: str


def next_weight_version(current: str, requested: str | None) -> str:
    """The requested version when given; else the current one with its trailing number incremented
    ("3" → "4", "v7" → "v8"), or "1" when it has none (the initial "default")."""
    if requested:
        return requested
    match = re.fullmatch(r"(.*?)(\d+)", current)
    return f"{match.group(1)}{int(match.group(2)) + 1}" if match else "1"


def _names(names: list[str] | set[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


ShardRules = dict[str, ShardRule] | None


def _checkpoint_shapes(local_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(local_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in list(f.keys()):
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_weights(
    model: nn.Module,
    model_config: ModelConfig,
    model_path: str,
    load_format: str | None = None,
) -> CheckedWeights:
    """Raises WeightsUpdateError unless `model_path` holds a checkpoint that fits `model` exactly
    (a tensor-parallel rank passes the whole model on the meta device: its slices are then cut as
    at load)."""
    if load_format not in UPDATE_LOAD_FORMATS:
        raise WeightsUpdateError(
            f"Failed to update weights: load_format {load_format!r} cannot be reloaded from disk "
            "(use auto or safetensors)."
        )
    try:
        resolved = resolve_model(model_path)
    except ModelNotFoundError as exc:
        raise WeightsUpdateError(f"Failed to get weights iterator: {exc}.") from exc
    try:
        new_config = ModelConfig.from_path(resolved.local_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsUpdateError(f"Failed to update weights: cannot read the config of {model_path}: {exc}.")
    if new_config.architectures != model_config.architectures:
        raise WeightsUpdateError(
            f"Failed to update weights: {model_path} is a {new_config.architectures} model, "
            f"the served model is {model_config.architectures}."
        )
    try:
        shapes = _checkpoint_shapes(resolved.local_dir)
    except (WeightLoadError, OSError) as exc:
        raise WeightsUpdateError(f"Failed to get weights iterator: {exc}.") from exc
    _check_shapes(model, shapes)
    return CheckedWeights(model_path, Path(resolved.local_dir), load_format or "auto")


def _as_model_names(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The checkpoint's shapes under the names the model loads them by: its `checkpoint_pairs`
    (renamed, fused tensors split) run over meta tensors, so no value is read."""
    pairs = getattr(model, "checkpoint_pairs", None)
    if pairs is None:
        return shapes
    meta = ((name, torch.empty(shape, device="meta")) for name, shape in shapes.items())
    return {name: tuple(tensor.shape) for name, tensor in pairs(meta)}


def _check_shapes(model: nn.Module, checkpoint_shapes: dict[str, tuple[int, ...]]) -> None:
    shapes = _as_model_names(model, checkpoint_shapes)
    ignore = getattr(model, "ignore_checkpoint_tensor", lambda name: False)
    targets = checkpoint_targets(model)
    unexpected: list[str] = []
    for name, shape in shapes.items():
        target = targets.get(name)
        if target is None:
            if not ignore(name):
                unexpected.append(name)
            continue
        param, rows = target
        expected = tuple(param.shape if rows is None else param[rows].shape)  # a view: no values read
        if shape != expected:
            raise WeightsUpdateError(
                f"Failed to update weights: tensor {name} has shape {list(shape)} in the checkpoint, "
                f"{list(expected)} in the served model."
            )
    if unexpected:
        raise WeightsUpdateError(
            f"Failed to update weights: tensors the served model does not have: {_names(unexpected)}."
        )
    missing = set(targets) - set(shapes)
    if missing:
        raise WeightsUpdateError(
            f"Failed to update weights: tensors missing from the checkpoint: {_names(missing)}."
        )


@torch.no_grad()
def apply_weights(model: nn.Module, checked: CheckedWeights, shard_rules: ShardRules = None) -> None:
    """Copies the checked checkpoint into `model` (engine idle). Raises WeightsUpdateError when
    reading fails half-way; the model's weights are then mixed and the caller must restore them."""
    try:
        model.load_weights(_weights(checked.local_dir, shard_rules), strict=True)
    except (WeightLoadError, OSError, RuntimeError) as exc:
        raise WeightsUpdateError(
            f"Failed to update weights: {exc}.\nRolling back to original weights."
        ) from exc


def restore_weights(
    model: nn.Module, args: EngineArgs, local_dir: Path, shard_rules: ShardRules = None
) -> None:
    """Restores the weights served before a failed copy (same source, same seed)."""
    if args.load_format == "dummy":
        init_dummy_weights(model, args.random_seed)
    else:
        model.load_weights(_weights(local_dir, shard_rules), strict=True)


def _weights(local_dir: Path, shard_rules: ShardRules):
    weights = iter_weights(local_dir)
    return shard_checkpoint(weights, shard_rules) if shard_rules else weights
