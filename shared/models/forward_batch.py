"""What one forward pass needs to know about its batch, as tensors.

A batch is a list of requests, each contributing a run of *new* tokens (`extend_len`) whose
keys/values are written into the paged KV pool at `out_cache_loc`, and which attend to the
request's `prefix_len` tokens already in the pool plus, causally, to themselves. Decode is the
case where every `extend_len` is 1; prefill (and chunked prefill) is any other.

Token slots: the KV pool stores token `j` of a request in page `page_table[i, j // page_size]`
at offset `j % page_size`; the flat slot is `page * page_size + offset`.

Models never look at pages: they hand q/k/v to `attn_backend.attend(layer_id, q, k, v, batch)`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch


class ForwardMode(enum.IntEnum):
    EXTEND = 1  # prefill or a chunk of it; lengths vary per request
    DECODE = 2  # one new token per request


class KVPool(Protocol):
    """What attention backends use of the paged KV pool (the engine's PagedKVPool,
    shared/engine/kv_pool.py); models never touch it."""

    kv: torch.Tensor  # [layers, 2, pages, page_size, kv_heads, head_dim]
    kv_scales: torch.Tensor | None  # an fp8 pool's [layers, planes] float32 scales; None otherwise

    @property
    def page_size(self) -> int: ...

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def gather(
        self, layer_id: int, pages: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class AttentionBackend(Protocol):
    """Stores the new tokens' K/V into the pool and returns attention output.

    q: [T, num_q_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (T = total new tokens).
    Returns [T, num_q_heads, head_dim] in q's dtype. `scale` is the softmax scale. Per layer,
    `window` (a sliding window of keys, None = none) and `softcap` (tanh logit capping, None =
    none) as kernels.attention_mask defines them.
    """

    def attend(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor: ...


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, new tokens of all requests, concatenated
    positions: torch.Tensor  # [T] int64, absolute position of each new token in its sequence
    out_cache_loc: torch.Tensor  # [T] int64, flat KV slot for each new token
    prefix_lens: torch.Tensor  # [B] int64, tokens already in the pool before this pass
    extend_lens: torch.Tensor  # [B] int64, new tokens this pass
    seq_lens: torch.Tensor  # [B] int64, prefix_lens + extend_lens
    extend_start_loc: torch.Tensor  # [B] int64, offset of each request's first new token in [T]
    page_table: torch.Tensor  # [B, max_pages] int32, page ids (padding: 0), covers seq_lens
    kv_pool: KVPool
    attn_backend: AttentionBackend
    # Which rows of the hidden states need logits: the last new token of each request, or every
    # new token where prompt logprobs are asked. Indices into [T].
    logits_indices: torch.Tensor
    # Host copies, so backends and the runner can loop without device syncs.
    prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_lens_cpu: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @staticmethod
    def build(
        mode: ForwardMode,
        input_ids: list[int],
        prefix_lens: list[int],
        extend_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        kv_pool: KVPool,
        attn_backend: AttentionBackend,
        logits_indices: list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """Builds the tensors from plain per-request lists (the scheduler's view)."""
        assert len(prefix_lens) == len(extend_lens) == len(page_tables)
        assert len(input_ids) == sum(extend_lens)
        positions: list[int] = []
        slots: list[int] = []
        starts: list[int] = []
        for prefix, extend, pages in zip(prefix_lens, extend_lens, page_tables):
            starts.append(len(positions))
            assert len(pages) * page_size >= prefix + extend, "page table does not cover the sequence"
            for pos in range(prefix, prefix + extend):
                positions.append(pos)
                slots.append(pages[pos // page_size] * page_size + pos % page_size)
        if logits_indices is None:
            logits_indices = [s + e - 1 for s, e in zip(starts, extend_lens)]
        max_pages = max((len(p) for p in page_tables), default=0)
        table = [p + [0] * (max_pages - len(p)) for p in page_tables]

        def i64(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=device)

        return ForwardBatch(
            mode=mode,
            input_ids=i64(input_ids),
            positions=i64(positions),
            out_cache_loc=i64(slots),
            prefix_lens=i64(prefix_lens),
            extend_lens=i64(extend_lens),
            seq_lens=i64([p + e for p, e in zip(prefix_lens, extend_lens)]),
            extend_start_loc=i64(starts),
            page_table=torch.tensor(table, dtype=torch.int32, device=device).reshape(len(table), max_pages),
            kv_pool=kv_pool,
            attn_backend=attn_backend,
            logits_indices=i64(logits_indices),
            prefix_lens_cpu=list(prefix_lens),
            extend_lens_cpu=list(extend_lens),
        )
