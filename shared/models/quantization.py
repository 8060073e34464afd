"""Which weights load as fp8: the checkpoint's `quantization_config`, or `--quantization fp8`.

Rules (as SGLang: an fp8 checkpoint is detected without a flag):
- `quant_method` "fbgemm_fp8" (Meta's Llama-3.1-*-FP8), "compressed-tensors" with 8-bit float
  weights per channel or per tensor (llm-compressor's FP8 and FP8-dynamic exports, e.g.
  RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8), and "fp8" without `weight_block_size`: the linear
  weights arrive as float8_e4m3fn with their `weight_scale`; static `input_scale`s are dropped,
  since activations are always scaled per token at run time.
- `--quantization fp8` on a 16/32-bit checkpoint quantizes the decoder layers' linears and MoE
  experts at load, per output channel (per expert and row for the experts).
- Block-wise fp8 (`weight_block_size`, DeepSeek-V3 / Qwen3-FP8 style) and other methods (AWQ,
  GPTQ, ...) are refused with a message naming them, never loaded wrong.
- What the checkpoint kept in its own dtype (`ignore` / `modules_to_not_convert` /
  `ignored_layers`, names or "re:" patterns) stays so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

QUANTIZATION_METHODS = ("fp8",)
# Checkpoint tensors an fp8 checkpoint carries that the dynamic scheme has no use for.
DROPPED_SUFFIXES = (".input_scale", ".input_scale_ub")


class QuantizationError(ValueError):
    """The checkpoint's quantization is one pdserve does not load."""


@dataclass(frozen=True)
class Fp8Scheme:
    checkpoint_is_fp8: bool  # weights arrive in fp8 with scales; else quantized at load
    kept: tuple[str, ...] = field(default=())  # module names or "re:" patterns left unquantized

    def keep(self, module_name: str) -> bool:
        for entry in self.kept:
            if entry.startswith("re:"):
                if re.fullmatch(entry[3:], module_name):
                    return True
            elif module_name == entry or module_name.endswith("." + entry):
                return True
        return False


def _as_dict(qc: Any) -> dict:
    return qc if isinstance(qc, dict) else qc.to_dict()


def _compressed_tensors_is_fp8(qc: dict) -> bool:
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    return bool(weights) and all(
        w.get("num_bits") == 8 and w.get("type") == "float" and w.get("strategy") in ("channel", "tensor")
        for w in weights
    )


def fp8_scheme(hf_config: Any, quantization: str | None) -> Fp8Scheme | None:
    """The model's fp8 scheme, None to load it as it is; raises QuantizationError."""
    if quantization not in (None, *QUANTIZATION_METHODS):
        raise QuantizationError(f"--quantization must be one of {QUANTIZATION_METHODS}, got {quantization!r}")
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return Fp8Scheme(checkpoint_is_fp8=False) if quantization == "fp8" else None
    qc = _as_dict(raw)
    method = qc.get("quant_method")
    kept = tuple(qc.get("ignore") or qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ())
    if method == "fbgemm_fp8":
        return Fp8Scheme(checkpoint_is_fp8=True, kept=kept)
    if method == "compressed-tensors" and _compressed_tensors_is_fp8(qc):
        return Fp8Scheme(checkpoint_is_fp8=True, kept=kept)
    if method == "fp8" and not qc.get("weight_block_size"):
        return Fp8Scheme(checkpoint_is_fp8=True, kept=kept)
    if method == "fp8":
        raise QuantizationError(
            f"block-wise fp8 checkpoints (weight_block_size {qc['weight_block_size']}) are not supported; "
            "per-channel and per-tensor fp8 are"
        )
    raise QuantizationError(
        f"checkpoint quantization {method!r} is not supported: pdserve loads fp8 (fbgemm_fp8, "
        "compressed-tensors float8, fp8 per tensor/channel) or quantizes 16-bit weights with --quantization fp8"
    )
