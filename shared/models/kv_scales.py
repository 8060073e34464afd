"""The KV cache scales an fp8 checkpoint may carry, collected for an fp8 KV pool (shared/engine/kv_pool.py).

Rules (the names vLLM and SGLang read):
- `...layers.<i>.self_attn.k_scale` and `.v_scale` (llm-compressor, ModelOpt), `...k_proj.output_scale`
  and `...v_proj.output_scale` (compressed-tensors' older form), and `...layers.<i>...kv_scale` (one
  scale for K and V both) are one float32 number per layer: stored = x / scale.
- They are taken out of the weight stream whatever the pool's dtype: a 16-bit pool has no use for
  them, and no model holds a parameter of that name. Attention's `q_scale` and `prob_scale` (for fp8
  attention arithmetic, which pdserve does not do) are dropped the same way.
- A layer without a scale gets 1.0; a checkpoint without any gives no scales at all (None).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_K_SUFFIXES = (".k_scale", ".k_proj.output_scale")
_V_SUFFIXES = (".v_scale", ".v_proj.output_scale")
_BOTH_SUFFIXES = (".kv_scale",)
_DROPPED_SUFFIXES = (".q_scale", ".prob_scale")


def is_kv_scale_name(name: str) -> bool:
    """Whether `name` is an attention scale a checkpoint may carry (K's, V's, or one dropped)."""
    if name.endswith(_DROPPED_SUFFIXES):
        return True
    return name.endswith((*_K_SUFFIXES, *_V_SUFFIXES, *_BOTH_SUFFIXES)) and _LAYER.search(name) is not None


class KVScaleCollector:
    def __init__(self) -> None:
        self.k: dict[int, float] = {}
        self.v: dict[int, float] = {}

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether `name` is an attention scale (kept if K's or V's); False: a weight to load."""
        if name.endswith(_DROPPED_SUFFIXES):
            return True
        planes = (
            [self.k] if name.endswith(_K_SUFFIXES)
            else [self.v] if name.endswith(_V_SUFFIXES)
            else [self.k, self.v] if name.endswith(_BOTH_SUFFIXES)
            else []
        )  # fmt: skip
        layer = _LAYER.search(name)
        if not planes or layer is None:
            return False
        for plane in planes:
            plane[int(layer.group(1))] = float(tensor.float().reshape(-1)[0])
        return True

    def weights_without_scales(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream with the scales taken out (and kept here)."""
        return ((name, t) for name, t in weights if not self.take(name, t))

    def as_tensor(self, num_layers: int, num_planes: int) -> torch.Tensor | None:
        """[num_layers, num_planes] float32 (K's, then V's; a one-plane pool keeps K's), 1.0 where a
        layer has none; None when the checkpoint had no KV scale."""
        if not self.k and not self.v:
            return None
        scales = torch.ones(num_layers, num_planes)
        for layer in range(num_layers):
            scales[layer, 0] = self.k.get(layer, 1.0)
            if num_planes == 2:
                scales[layer, 1] = self.v.get(layer, 1.0)
        return scales
