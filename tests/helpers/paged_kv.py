"""Paged K/V for attention-kernel tests, built to catch out-of-bounds and unwritten reads.

Pages are a random permutation of ids that skips page 0; every slot outside a sequence (page 0,
the unused tail of a last page, three spare pages nobody owns) holds NaN, and the page table has
one padding column of zeros past the longest row."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    k_pages: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_pages: torch.Tensor
    page_table: torch.Tensor  # [B, max_pages + 1] int32
    keys: list[torch.Tensor]  # each request's K [seq_len, Hkv, D], contiguous
    values: list[torch.Tensor]


def random_paged_kv(
    seq_lens: list[int], page_size: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator
) -> PagedKV:
    """Random K/V for sequences of `seq_lens` tokens scattered over NaN-filled pages (CPU)."""
    pages_per_req = [-(-s // page_size) for s in seq_lens]
    num_pages = 1 + sum(pages_per_req) + 3  # page 0 and three spare pages nobody owns
    ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    k_pages = torch.full((num_pages, page_size, hkv, d), math.nan, dtype=dtype)
    v_pages = torch.full_like(k_pages, math.nan)
    table = torch.zeros((len(seq_lens), max(pages_per_req) + 1), dtype=torch.int32)  # + a padding column
    keys, values = [], []
    for i, (seq_len, n) in enumerate(zip(seq_lens, pages_per_req)):
        row, ids = ids[:n], ids[n:]
        table[i, :n] = torch.tensor(row, dtype=torch.int32)
        k = torch.randn(seq_len, hkv, d, generator=gen).to(dtype)
        v = torch.randn(seq_len, hkv, d, generator=gen).to(dtype)
        for j in range(seq_len):
            k_pages[row[j // page_size], j % page_size] = k[j]
            v_pages[row[j // page_size], j % page_size] = v[j]
        keys.append(k)
        values.append(v)
    return PagedKV(k_pages, v_pages, table, keys, values)
