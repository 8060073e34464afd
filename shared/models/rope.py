"""Rotary position embeddings, matching Hugging Face's (rotate-half / "neox" layout).

Rules:
- The rope settings are read from either config layout: transformers 5 keeps them in
  `rope_parameters` (with `rope_theta` inside), older versions in `rope_scaling` + `rope_theta`.
- "default", "linear" and "llama3" (Llama 3.1) are computed here; "yarn" borrows transformers'
  `ROPE_INIT_FUNCTIONS`. Types whose frequencies depend on the running sequence length ("dynamic",
  "longrope") and partial rotary dims are refused: a paged engine applies rope once per token.
- Angles are computed in float32 from the absolute positions on every call (no cos/sin cache to
  size by context length), and rope is applied in float32, then cast back to q/k's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_OWN_TYPES = ("default", "linear", "llama3")
_BORROWED_TYPES = ("yarn",)


def _rope_dict(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None)
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope parameters are not supported")
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    head_dim: int
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    hf_config: Any = field(default=None, repr=False, compare=False)  # only for borrowed types

    @staticmethod
    def from_hf_config(hf_config: Any) -> RopeConfig:
        params = _rope_dict(hf_config)
        rope_type = params["rope_type"]
        if rope_type not in _OWN_TYPES + _BORROWED_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported; supported: {_OWN_TYPES + _BORROWED_TYPES}"
            )
        partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
        if partial not in (None, 1.0):
            raise ValueError(f"partial rotary embeddings (factor {partial}) are not supported")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 8192
        return RopeConfig(
            rope_type=rope_type,
            theta=float(params["rope_theta"]),
            head_dim=int(head_dim),
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", max_pos)),
            hf_config=hf_config if rope_type in _BORROWED_TYPES else None,
        )

    def inv_freq_and_scaling(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim // 2] (float32, CPU) and the cos/sin scaling factor."""
        if self.rope_type in _BORROWED_TYPES:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            # CPU explicitly: models are built under a meta-device context, which would turn
            # transformers' factory calls into data-less meta tensors.
            with torch.device("cpu"):
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.hf_config, torch.device("cpu"))
            return inv_freq.float(), float(scaling)
        dim = self.head_dim
        # Explicit CPU: models are built under a meta-device context, which factory calls would obey.
        steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
        inv_freq = 1.0 / (self.theta ** (steps / dim))
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.factor
        elif self.rope_type == "llama3":
            inv_freq = _llama3_scale(inv_freq, self)
        return inv_freq, 1.0


def _llama3_scale(inv_freq: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between."""
    old_len = cfg.original_max_position_embeddings
    low_freq_wavelen = old_len / cfg.low_freq_factor
    high_freq_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rope angles at absolute positions; `apply_rotary` rotates q and k with them.

    `inv_freq` is a float32 non-persistent buffer (never in checkpoints). A model built on the meta
    device must call `reset_buffers()` after materializing; never cast the model with `.to(dtype)`.
    """

    def __init__(self, rope: RopeConfig):
        super().__init__()
        self._host_inv_freq, self.attention_scaling = rope.inv_freq_and_scaling()
        self.register_buffer("inv_freq", self._host_inv_freq.clone(), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = self._host_inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] (float32) for `positions` [T]; computed once per forward pass."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] by `RotaryEmbedding(positions)`, in float32."""
    cos, sin = cos_sin
    q32, k32 = q.float(), k.float()
    q_out = q32 * cos + _rotate_half(q32) * sin
    k_out = k32 * cos + _rotate_half(k32) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)
