"""Second checkpoints for weight-update tests: copies of a tiny checkpoint with other values or a
wrong shape (same config, same tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """A checkpoint with the names and shapes of `src` and other values."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def misshapen_copy(src: Path, dst: Path, name: str) -> Path:
    """`src` with tensor `name` cut to half its rows."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
