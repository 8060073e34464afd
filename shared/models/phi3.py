"""Phi-3 (Phi3ForCausalLM): the Mistral layout with q/k/v and gate/up fused in the checkpoint.

The checkpoint's `self_attn.qkv_proj` ([q; k; v] rows) and `mlp.gate_up_proj` ([gate; up] rows)
are the layouts of our merged layers already; loading splits them into the shard names the
loader knows. The config's `sliding_window` applies to every layer (as transformers' Phi-3).
Rope as the config says; types pdserve does not compute (longrope, and its old name su, which
depend on the running sequence length) are refused by shared.models.rope when the config is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pdserve.shared.models.layers import MergedLinear
from pdserve.shared.models.llama import MistralForCausalLM
from pdserve.shared.models.weights import WeightLoadError

_FUSED = ("qkv_proj", "gate_up_proj")


class Phi3ForCausalLM(MistralForCausalLM):
    def split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint pairs with each fused tensor replaced by its shards (q/k/v, gate/up)."""
        for name, tensor in weights:
            module_name, _, attr = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            if leaf not in _FUSED:
                yield name, tensor
                continue
            merged = self.get_submodule(module_name)
            assert isinstance(merged, MergedLinear)
            if tensor.shape[0] != merged.out_features:
                raise WeightLoadError(
                    f"tensor {name}: checkpoint has {tensor.shape[0]} rows, model {merged.out_features}"
                )
            for shard in merged.shards:
                yield f"{parent}.{shard}.{attr}", tensor[merged.shard_rows(shard)]

    def checkpoint_pairs(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return self.split_fused(weights)
