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
from pdserve.shared.models.fp8_checkpoint import (
    SCALE_SUFFIX,
    check_fp8_pairs,
    fp8_checkpoint,
    fp8_weight_names,
    is_fp8,
)
from pdserve.shared.models.kv_scales import is_kv_scale_name
from pdserve.shared.models.loader import init_dummy_weights, iter_weights, safetensors_files
from pdserve.shared.models.quantization import DROPPED_SUFFIXES, QuantizationError, fp8_scheme
from pdserve.shared.models.resolver import ModelNotFoundError, resolve_model
from pdserve.shared.models.tensor_parallel import ShardRule, shard_checkpoint
from pdserve.shared.models.weights import WeightLoadError, checkpoint_targets, load_checkpoint_weights

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


# safetensors' dtype names, for the header check (meta tensors carry shape and dtype, no values)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _checkpoint_tensors(local_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors on the meta device: shapes and dtypes from the headers."""
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(local_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in list(f.keys()):
                piece = f.get_slice(name)
                dtype = _DTYPES.get(piece.get_dtype(), torch.float32)
                tensors[name] = torch.empty(tuple(piece.get_shape()), dtype=dtype, device="meta")
    return tensors


def check_weights(
    model: nn.Module,
    model_config: ModelConfig,
    model_path: str,
    load_format: str | None = None,
    served_load_format: str = "auto",
) -> CheckedWeights:
    """Raises WeightsUpdateError unless `model_path` holds a checkpoint that fits `model` exactly
    (a tensor-parallel rank passes the whole model on the meta device: its slices are then cut as
    at load); `served_load_format` is how the live weights were loaded."""
    _refuse_fp8_dummy_update(model, served_load_format)
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
        fp8_scheme(new_config.hf_config, None)
    except QuantizationError as exc:
        raise WeightsUpdateError(f"Failed to update weights: {exc}.") from exc
    try:
        tensors = _checkpoint_tensors(resolved.local_dir)
    except (WeightLoadError, OSError) as exc:
        raise WeightsUpdateError(f"Failed to get weights iterator: {exc}.") from exc
    _check_shapes(model, tensors)
    return CheckedWeights(model_path, Path(resolved.local_dir), load_format or "auto")


def _refuse_fp8_dummy_update(model: nn.Module, served_load_format: str) -> None:
    """An fp8 model drawn from dummy weights could not be restored after a failed copy (its random
    weights were quantized after they were drawn): such a model is not updated at all."""
    if served_load_format == "dummy" and fp8_weight_names(checkpoint_targets(model)):
        raise WeightsUpdateError(
            "Failed to update weights: an fp8 model served with --load-format dummy cannot be updated "
            "(its weights could not be restored if the update failed); serve it from a checkpoint."
        )


def _as_model_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's meta tensors under the names the model loads them by: its
    `checkpoint_pairs` (renamed, fused tensors split), so no value is read."""
    pairs = getattr(model, "checkpoint_pairs", None)
    return tensors if pairs is None else dict(pairs(tensors.items()))


def _check_shapes(model: nn.Module, checkpoint_tensors: dict[str, torch.Tensor]) -> None:
    # the KV pool's scales are read at load only: an update leaves them as they are
    checkpoint_tensors = {n: t for n, t in checkpoint_tensors.items() if not is_kv_scale_name(n)}
    tensors = _as_model_names(model, checkpoint_tensors)
    ignore = getattr(model, "ignore_checkpoint_tensor", lambda name: False)
    targets = checkpoint_targets(model)
    fp8_weights = fp8_weight_names(targets)
    problem = check_fp8_pairs(targets, tensors)
    if problem is not None:
        raise WeightsUpdateError(f"Failed to update weights: {problem}.")
    # an fp8 model drops static input scales, and a 16-bit weight brings its own scale
    if fp8_weights:
        tensors = {n: t for n, t in tensors.items() if not n.endswith(DROPPED_SUFFIXES)}
    quantized_here = {w + SCALE_SUFFIX for w in fp8_weights if w in tensors and not is_fp8(tensors[w].dtype)}
    unexpected: list[str] = []
    for name, tensor in tensors.items():
        target = targets.get(name)
        if target is None:
            if not ignore(name):
                unexpected.append(name)
            continue
        if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in fp8_weights:
            continue  # one per tensor or per row, checked by check_fp8_pairs
        shape = tuple(tensor.shape)
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
    missing = set(targets) - set(tensors) - quantized_here
    if missing:
        raise WeightsUpdateError(
            f"Failed to update weights: tensors missing from the checkpoint: {_names(missing)}."
        )


@torch.no_grad()
def apply_weights(
    model: nn.Module,
    checked: CheckedWeights,
    shard_rules: ShardRules = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Copies the checked checkpoint into `model` (engine idle; `dtype` the model's, which 16-bit
    weights are rounded to before an fp8 model quantizes them). Raises WeightsUpdateError when
    reading fails half-way; the model's weights are then mixed and the caller must restore them."""
    try:
        _load(model, checked.local_dir, shard_rules, dtype)
    except (WeightLoadError, OSError, RuntimeError) as exc:
        raise WeightsUpdateError(
            f"Failed to update weights: {exc}.\nRolling back to original weights."
        ) from exc


def restore_weights(
    model: nn.Module,
    args: EngineArgs,
    local_dir: Path,
    shard_rules: ShardRules = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Restores the weights served before a failed copy (same source, same seed)."""
    if args.load_format == "dummy":
        init_dummy_weights(model, args.random_seed)
    else:
        _load(model, local_dir, shard_rules, dtype)


def _load(model: nn.Module, local_dir: Path, shard_rules: ShardRules, dtype: torch.dtype) -> None:
    weights = ((name, t) for name, t in iter_weights(local_dir) if not is_kv_scale_name(name))
    fp8_weights = fp8_weight_names(checkpoint_targets(model))
    if not fp8_weights:
        model.load_weights(shard_checkpoint(weights, shard_rules) if shard_rules else weights, strict=True)
        return
    # fp8: 16-bit weights quantized, fp8 ones and their scales as they are, under the model's names
    # (tensor-parallel families load by the checkpoint's own names, so the rules still apply)
    weights = ((name, t) for name, t in weights if not name.endswith(DROPPED_SUFFIXES))
    pairs = getattr(model, "checkpoint_pairs", lambda w: w)(weights)
    ignore = getattr(model, "ignore_checkpoint_tensor", lambda name: False)
    load_checkpoint_weights(
        model, fp8_checkpoint(pairs, fp8_weights, dtype, shard_rules), ignore, strict=True
    )
