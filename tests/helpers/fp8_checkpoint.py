"""Tiny fp8 checkpoints written from a tiny 16/32-bit one, as llm-compressor or fbgemm export them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pdserve.kernels.fp8_quant import per_channel_quant_fp8

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                  "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
                                  "targets": ["Linear"]}},
    "ignore": ["lm_head"],
}  # fmt: skip
COMPRESSED_TENSORS_PER_TENSOR = {
    **COMPRESSED_TENSORS,
    "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}},
}
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}


def fp8_checkpoint(src: Path, dst: Path, per_tensor: bool, quantization_config: dict) -> Path:
    """src's tiny checkpoint with its layers' projections stored as fp8 + scales (+ input scales)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            w = tensors[name]
            if per_tensor:
                scale = w.abs().amax().clamp(min=1e-12) / 448.0
                q = (w / scale).to(torch.float8_e4m3fn)
                scale = scale.reshape(1)
            else:
                q, scale = per_channel_quant_fp8(w)
                scale = scale[:, None]
            tensors[name] = q
            tensors[name[: -len("weight")] + "weight_scale"] = scale
            tensors[name[: -len("weight")] + "input_scale"] = torch.ones(1)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    for extra in src.iterdir():  # the tokenizer files, so a worker can serve it
        if extra.is_file() and not (dst / extra.name).exists():
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst
