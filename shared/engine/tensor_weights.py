"""Parameters of a live model by name: new values from tensors, and a truncated read-out.

    checked = check_named_tensors(model, named, load_format=None)   # WeightsUpdateError if one does not fit
    apply_named_tensors(checked)                                     # only on an idle engine
    rows = weights_by_name(model, "model.layers.0.self_attn.q_proj.weight", truncate_size=100)

Rules (`/update_weights_from_tensor` and `/get_weights_by_name`, as SGLang has them):
- names are checkpoint (Hugging Face) names by default, as `/update_weights_from_disk` reads them:
  a merged q/k/v or gate/up parameter answers to each part's name; load_format "direct" takes the
  model's own parameter names (SGLang's "direct"); other formats are refused;
- every tensor is checked (a known name, exactly the target's shape, a floating dtype) before any
  is copied: an update copies all of its tensors or none;
- on an fp8 linear (or fp8 expert) a 16/32-bit weight is quantized per output row into the fp8
  weight and its `weight_scale`; an fp8 weight is copied as it is and needs its `weight_scale` in
  the same update (one per row, or one per tensor); fp8 values for a 16-bit parameter are refused
  (shared.models.fp8_checkpoint);
- parameters not named keep their values (an RL step may send only what changed); tensors a model
  drops on purpose (rotary buffers, the lm_head of a tied model) are skipped, as a checkpoint load does;
- a read-out is the first `truncate_size` rows of the parameter (elements of a 1-D one) in float32,
  as nested lists; a tied model's `lm_head.weight` reads the embedding, which it shares. An fp8
  weight reads as its stored e4m3 values, without its scale (as SGLang returns the parameter);
  `<name>_scale` reads the scales.
Under tensor parallelism each rank checks and copies its slices (tp_tensor_updates.py) and a
read-out is gathered from every rank (tp_weight_reads.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pdserve.shared.engine.weight_swap import WeightsUpdateError
from pdserve.shared.models.fp8_checkpoint import (
    SCALE_SUFFIX,
    check_fp8_pairs,
    fp8_weight_names,
    is_fp8,
    quantize_rows,
)
from pdserve.shared.models.kv_scales import is_kv_scale_name
from pdserve.shared.models.quantization import DROPPED_SUFFIXES
from pdserve.shared.models.weights import Target, TargetIndex, checkpoint_targets, scale_as

TENSOR_LOAD_FORMATS = (None, "auto", "direct")
TENSOR_UPDATE_OK = "Success"


@dataclass
class CheckedTensors:
    """Tensors that fit their targets, with where each goes (`rows` None: the whole parameter)."""

    copies: list[tuple[nn.Parameter, TargetIndex, torch.Tensor]]


def _targets(model: nn.Module, load_format: str | None) -> dict[str, Target]:
    if load_format == "direct":
        return {name: (param, None) for name, param in model.named_parameters()}
    return checkpoint_targets(model)


def _dropped_at_load(name: str, fp8_model: bool) -> bool:
    """A checkpoint tensor that loading drops too: KV-cache scales (read at load only) and, on an
    fp8 model, static activation scales (its activations are quantized per token)."""
    return is_kv_scale_name(name) or (fp8_model and name.endswith(DROPPED_SUFFIXES))


def check_named_tensors(
    model: nn.Module,
    named: list[tuple[str, torch.Tensor]],
    load_format: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> CheckedTensors:
    """Raises WeightsUpdateError (message for the client) unless every tensor fits its target;
    `dtype` is the model's (16-bit weights for an fp8 parameter are rounded to it, then quantized)."""
    if load_format not in TENSOR_LOAD_FORMATS:
        raise WeightsUpdateError(
            f"Failed to update weights: load_format {load_format!r} is not supported "
            '(use null for checkpoint names or "direct" for the model\'s parameter names).'
        )
    if not named:
        raise WeightsUpdateError("Failed to update weights: no tensors were given.")
    targets = _targets(model, load_format)
    ignore = getattr(model, "ignore_checkpoint_tensor", lambda name: False)
    problem = check_fp8_pairs(targets, dict(named))
    if problem is not None:
        raise WeightsUpdateError(f"Failed to update weights: {problem}.")
    fp8_weights = fp8_weight_names(targets)
    copies: list[tuple[nn.Parameter, TargetIndex, torch.Tensor]] = []
    for name, tensor in named:
        if name.removesuffix(SCALE_SUFFIX) in fp8_weights and name.endswith(SCALE_SUFFIX):
            param, rows = targets[name]  # one per tensor or per row (check_fp8_pairs)
            copies.append((param, rows, scale_as(tensor, (param if rows is None else param[rows]).shape)))
            continue
        target = targets.get(name)
        if target is None:
            if load_format != "direct" and (ignore(name) or _dropped_at_load(name, bool(fp8_weights))):
                continue
            raise WeightsUpdateError(f"Failed to update weights: the served model has no parameter {name}.")
        param, rows = target
        expected = tuple(param.shape if rows is None else param[rows].shape)
        if tuple(tensor.shape) != expected:
            raise WeightsUpdateError(
                f"Failed to update weights: tensor {name} has shape {list(tensor.shape)}, "
                f"the served model's is {list(expected)}."
            )
        if not tensor.is_floating_point():
            raise WeightsUpdateError(
                f"Failed to update weights: tensor {name} is {tensor.dtype}, not a floating-point tensor."
            )
        if name in fp8_weights and not is_fp8(tensor.dtype):  # quantized here, with its scale
            weight, scale = quantize_rows(tensor, dtype)
            copies += [(param, rows, weight), (*targets[name + SCALE_SUFFIX], scale)]
            continue
        copies.append((param, rows, tensor))
    return CheckedTensors(copies)


@torch.no_grad()
def apply_named_tensors(checked: CheckedTensors) -> None:
    """Copies the checked tensors in (converted to each parameter's dtype and device)."""
    for param, rows, tensor in checked.copies:
        dest = param.data if rows is None else param.data[rows]
        dest.copy_(tensor)


def parameter_by_name(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter (or the rows of a merged one) by its model or checkpoint name; KeyError if none."""
    own = dict(model.named_parameters())
    if name in own:
        return own[name]
    target = checkpoint_targets(model).get(name)
    if target is not None:
        param, rows = target
        return param if rows is None else param[rows]
    if name == "lm_head.weight" and getattr(model, "lm_head", 0) is None:  # tied: logits use the embedding
        weight = model.get_submodule("model.embed_tokens").weight
        assert isinstance(weight, torch.Tensor)
        return weight
    raise KeyError(name)


@torch.no_grad()
def weights_by_name(model: nn.Module, name: str, truncate_size: int = 100) -> list:
    """The parameter's first `truncate_size` rows as float32 lists; KeyError for an unknown name."""
    param = parameter_by_name(model, name)
    return param[:truncate_size].to(device="cpu", dtype=torch.float32).tolist()
