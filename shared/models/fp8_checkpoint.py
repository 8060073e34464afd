"""Checkpoint tensors on their way into an fp8 model: 16/32-bit weights quantized into its fp8
parameters, fp8 weights and their scales passed as they are, each cut to a tensor-parallel rank's
slice.

Rules:
- An fp8 weight is a target whose parameter is float8 and whose name, plus "_scale", names its
  scale (an Fp8Linear's shard, an fp8 expert's linear): `fp8_weight_names`.
- A 16/32-bit tensor bound for one is first rounded to the model's dtype (as a load into the
  16-bit model would), then quantized per output row (kernels.fp8_quant.per_channel_quant_fp8,
  the arithmetic of quantizing at load), and its scale is emitted right after it. Quantizing is
  per row, so a slice of rows quantizes to the same bits as those rows of the whole tensor: a
  column-parallel slice is cut first; a row-parallel slice (its columns of every row) needs its
  rows' scales from the whole rows, so the whole tensor is quantized and then cut.
- An fp8 checkpoint's scale is cut with its weight's rows when it holds one per row (a
  column-parallel weight); a per-tensor scale, or the scale of a row-parallel weight (whose rows
  every rank holds), is the same on every rank.
- `check_fp8_pairs` says what cannot load: fp8 values for a parameter that has no scale, an fp8
  weight without its scale, a scale beside a 16-bit weight (which brings its own), a scale of the
  wrong size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from pdserve.kernels.fp8_quant import per_channel_quant_fp8
from pdserve.shared.models.tensor_parallel import ShardRule
from pdserve.shared.models.weights import Target

SCALE_SUFFIX = "_scale"


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_weight_names(targets: Mapping[str, Target]) -> set[str]:
    """The checkpoint names whose parameter holds fp8 values read by a `<name>_scale`."""
    return {
        name
        for name, (param, _) in targets.items()
        if is_fp8(param.dtype) and name.endswith(".weight") and name + SCALE_SUFFIX in targets
    }


def quantize_rows(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per row) of a 16/32-bit weight, rounded to `dtype` first."""
    return per_channel_quant_fp8(tensor.to(dtype))


def fp8_checkpoint(
    weights: Iterable[tuple[str, torch.Tensor]],
    fp8_weights: set[str],
    dtype: torch.dtype,
    rules: Mapping[str, ShardRule] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` as the fp8 model loads them, cut by `rules` when given (see the module rules)."""
    rules = rules or {}
    for name, tensor in weights:
        rule = rules.get(name)
        if name in fp8_weights and not is_fp8(tensor.dtype):
            if rule is not None and rule.dim == 0:
                weight, scale = quantize_rows(rule.apply(tensor), dtype)
            else:
                weight, scale = quantize_rows(tensor, dtype)
                weight = weight if rule is None else rule.apply(weight)
            yield name, weight
            yield name + SCALE_SUFFIX, scale
        elif name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in fp8_weights:
            weight_rule = rules.get(name[: -len(SCALE_SUFFIX)])
            if weight_rule is not None and weight_rule.dim == 0 and tensor.numel() > 1:  # one per row
                tensor = weight_rule.apply(tensor.reshape(-1))
            yield name, tensor
        else:
            yield name, tensor if rule is None else rule.apply(tensor)


def check_fp8_pairs(targets: Mapping[str, Target], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `tensors` (real or on the meta device, by target name) from loading into an fp8
    model's `targets`, or None. Tensors without a target are left to the caller."""
    fp8_weights = fp8_weight_names(targets)
    for name, tensor in tensors.items():
        target = targets.get(name)
        if target is None:
            continue
        param, rows = target
        if is_fp8(tensor.dtype) and not is_fp8(param.dtype):
            return (
                f"tensor {name} is {tensor.dtype}, but the served model holds it in {param.dtype} "
                "and has no scale to read it by"
            )
        scale = tensors.get(name + SCALE_SUFFIX)
        if name in fp8_weights and is_fp8(tensor.dtype) and scale is None:
            return f"tensor {name} is {tensor.dtype} but {name}{SCALE_SUFFIX} is not given with it"
        if name in fp8_weights and not is_fp8(tensor.dtype) and scale is not None:
            return (
                f"tensor {name} is {tensor.dtype} and is quantized to fp8 here, so "
                f"{name}{SCALE_SUFFIX} cannot be given with it"
            )
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in fp8_weights:
            size = (param if rows is None else param[rows]).numel()
            if tensor.numel() not in (1, size):
                return (
                    f"tensor {name} has shape {list(tensor.shape)}: an fp8 scale is one value per "
                    f"tensor or one per row ({size})"
                )
    return None
