"""Building a model from a ModelConfig and filling its weights.

Rules:
- The model is built on the meta device and materialized once on the target device, so no memory
  or time goes to an initialization that the weights overwrite.
- load_format "auto" and "safetensors" read `*.safetensors` (one file, or shards listed by
  `model.safetensors.index.json`); "dummy" draws deterministic random weights (normal, std 0.02;
  norm weights 1) from `seed` on the target device, for benchmarks without a checkpoint.
- The result is in eval mode, without grad, in `config.dtype`, on `device`; under an fp8 scheme
  (shared.models.quantization) the decoder layers' linears and MoE experts are fp8 (shared.models.fp8_linear, fp8_moe):
  swapped in before an fp8 checkpoint loads, or quantized from the loaded (or dummy) weights.
- KV cache scales in the checkpoint (shared.models.kv_scales) never reach the model: they go to
  `kv_scales` when given (the model runner's, for an fp8 KV pool), else they are dropped.
- A tensor-parallel rank builds the whole model on the meta device, shards it (a pass,
  shared.models.tensor_parallel) and loads its slice of each tensor of the full checkpoint; its
  dummy weights are drawn for its slices (they differ from a single rank's). Under an fp8 scheme
  its fp8 modules are swapped in first and a 16-bit checkpoint is quantized as it streams
  (shared.models.fp8_checkpoint), so each slice holds the single-rank model's bits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fp8_checkpoint import fp8_checkpoint, fp8_weight_names
from pdserve.shared.models.fp8_linear import fp8_linears_for_checkpoint, quantize_linears
from pdserve.shared.models.fp8_moe import fp8_experts_for_checkpoint, quantize_experts
from pdserve.shared.models.kv_scales import KVScaleCollector
from pdserve.shared.models.quantization import DROPPED_SUFFIXES, fp8_scheme
from pdserve.shared.models.registry import get_model_class
from pdserve.shared.models.tensor_parallel import ShardRule, shard_checkpoint, shard_model
from pdserve.shared.models.tensor_parallel_fp8 import fp8_row_parallel_for_checkpoint, quantize_row_parallel
from pdserve.shared.models.tensor_parallel_layers import TPRank
from pdserve.shared.models.weights import WeightLoadError, checkpoint_targets

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DUMMY_STD = 0.02


def safetensors_files(local_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files, in a stable order; WeightLoadError when there are none."""
    local_dir = Path(local_dir)
    index = local_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [local_dir / name for name in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise WeightLoadError(f"shards listed in {index} are missing: {absent}")
        return files
    if (local_dir / "model.safetensors").is_file():
        return [local_dir / "model.safetensors"]
    files = sorted(local_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors weights in {local_dir} (only safetensors checkpoints load)")
    return files


def iter_weights(local_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, CPU tensor) for every tensor of the checkpoint in `local_dir`, file by file."""
    for path in safetensors_files(local_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())  # safe_open handles are not iterable
            for name in names:
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Deterministic random weights: norms the identity (weight 1, or a norm's `neutral_weight`),
    everything else normal(0, DUMMY_STD), drawn in name order."""
    params = list(model.named_parameters())
    if not params:
        return
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    # a norm whose scale is not its weight says which weight leaves its input alone (Gemma's 1 + w: 0)
    neutral: dict[int, float] = {}
    for module in model.modules():
        value = getattr(module, "neutral_weight", None)
        if isinstance(value, float):
            neutral[id(module.weight)] = value
    for name, param in params:
        if id(param) in neutral:
            param.fill_(neutral[id(param)])
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_STD, generator=generator)


# what nn modules' reset_parameters call: on the meta device they compute nothing, and their
# decompositions import torch._dynamo (half a second of every worker's start)
_PARAM_INITS = (
    "normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
    "trunc_normal_", "zeros_", "ones_", "constant_",
)  # fmt: skip


@contextmanager
def on_meta_device() -> Iterator[None]:
    """`torch.device("meta")` with nn.init's initialisers turned into no-ops meanwhile."""
    saved = {name: getattr(nn.init, name) for name in _PARAM_INITS}
    for name in _PARAM_INITS:
        setattr(nn.init, name, _unchanged)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def _unchanged(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


def meta_model(config: ModelConfig, quantization: str | None = None) -> nn.Module:
    """The whole model for `config` on the meta device: its shapes, no memory, no values (with
    its fp8 modules under an fp8 scheme)."""
    with on_meta_device():
        model = get_model_class(config.architectures)(config)
        scheme = fp8_scheme(config.hf_config, quantization)
        if scheme is not None:
            _fp8_modules(model, scheme.keep, for_checkpoint=True)
        return model


def shard_rules_of(config: ModelConfig, tp_rank: TPRank) -> dict[str, ShardRule]:
    """The checkpoint slices `tp_rank` loads, as `load_model` cuts them (a weight update cuts the
    new checkpoint alike)."""
    with on_meta_device():
        return shard_model(meta_model(config), config, tp_rank)


def _fp8_modules(model: nn.Module, keep: Callable[[str], bool], for_checkpoint: bool) -> None:
    """The fp8 modules in place of the linears and experts: empty ones for a checkpoint to fill,
    else converted from their weights."""
    if for_checkpoint:
        fp8_linears_for_checkpoint(model, keep)
        fp8_experts_for_checkpoint(model, keep)
        fp8_row_parallel_for_checkpoint(model, keep)
    else:
        quantize_linears(model, keep)
        quantize_experts(model, keep)
        quantize_row_parallel(model, keep)


def load_model(
    config: ModelConfig,
    local_dir: str | Path | None,
    load_format: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    quantization: str | None = None,
    kv_scales: KVScaleCollector | None = None,
    tp_rank: TPRank | None = None,
) -> nn.Module:
    """The model for `config` with its weights (see the module rules); with `tp_rank`, that rank's
    slice of it (shared.models.tensor_parallel)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    scheme = fp8_scheme(config.hf_config, quantization)
    model_class = get_model_class(config.architectures)
    with on_meta_device():
        model = model_class(config)
        shard_rules = shard_model(model, config, tp_rank) if tp_rank is not None else None
    # a rank quantizes while its slices load: a row-parallel slice needs its whole rows' scales
    fp8_loaded = (
        scheme is not None
        and (scheme.checkpoint_is_fp8 or shard_rules is not None)
        and load_format != "dummy"
    )
    if fp8_loaded:
        _fp8_modules(model, scheme.keep, for_checkpoint=True)  # type: ignore[union-attr]
    model.to_empty(device=torch.device(device))
    model.reset_buffers()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if local_dir is None:
            raise WeightLoadError(f"load_format {load_format!r} needs a checkpoint directory")
        collector = kv_scales if kv_scales is not None else KVScaleCollector()
        weights = collector.weights_without_scales(iter_weights(local_dir))
        if fp8_loaded:
            weights = ((name, t) for name, t in weights if not name.endswith(DROPPED_SUFFIXES))
        if shard_rules is not None and fp8_loaded:
            targets = checkpoint_targets(model)
            weights = fp8_checkpoint(weights, fp8_weight_names(targets), config.dtype, shard_rules)
        elif shard_rules is not None:
            weights = shard_checkpoint(weights, shard_rules)
        model.load_weights(weights)
    if scheme is not None and not fp8_loaded:
        _fp8_modules(model, scheme.keep, for_checkpoint=False)
    model.eval()
    model.requires_grad_(False)
    return model
