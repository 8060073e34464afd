"""The two checkpoint forms of MoE expert weights, read as one.

transformers 5 holds experts fused in memory (`mlp.experts.gate_up_proj` [E, 2*I, H], gate rows
then up rows; `mlp.experts.down_proj` [E, H, I]) and its `save_pretrained` converts them back to
one tensor per expert (`mlp.experts.{e}.gate_proj/up_proj/down_proj.weight` for Qwen2-MoE,
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` for Mixtral); a state dict saved as it is keeps
the fused form, and Mixtral's fused form sits under `mlp.` instead of `block_sparse_moe.`.
`per_expert_tensors` rewrites the fused form into the per-expert names (views, no copies), so the
model answers to one set of names (`SparseMoeBlock.named_checkpoint_targets`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

FUSED_GATE_UP, FUSED_DOWN = "gate_up_proj", "down_proj"


def _block_name(head: str, checkpoint_prefix: str | None) -> str:
    """ "model.layers.3.mlp" -> "model.layers.3.block_sparse_moe" when the family names it so."""
    if checkpoint_prefix is None or not head.endswith(".mlp"):
        return head
    return head[: -len("mlp")] + checkpoint_prefix


def per_expert_tensors(
    weights: Iterable[tuple[str, torch.Tensor]],
    names: tuple[str, str, str],
    checkpoint_prefix: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` with fused expert tensors split per expert under `names` (gate, up, down)."""
    gate, up, down = names
    for name, tensor in weights:
        head, sep, tail = name.rpartition(".experts.")
        if sep and tail in (FUSED_GATE_UP, FUSED_DOWN) and tensor.dim() == 3:
            prefix = f"{_block_name(head, checkpoint_prefix)}.experts"
            for e in range(tensor.shape[0]):
                if tail == FUSED_DOWN:
                    yield f"{prefix}.{e}.{down}.weight", tensor[e]
                else:
                    gate_rows, up_rows = tensor[e].chunk(2, dim=0)
                    yield f"{prefix}.{e}.{gate}.weight", gate_rows
                    yield f"{prefix}.{e}.{up}.weight", up_rows
            continue
        block, sep, rest = name.rpartition(".gate.")
        if sep and rest == "weight":
            yield f"{_block_name(block, checkpoint_prefix)}.gate.weight", tensor
            continue
        yield name, tensor
