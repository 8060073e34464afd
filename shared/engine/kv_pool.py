"""The paged KV pool: per layer one K and one V tensor shaped [num_pages, page_size, kv_heads, head_dim].

All of them are views of one tensor `kv` [num_layers, 2 (K, V), num_pages, page_size, kv_heads,
head_dim]: `k_buffers[l]` is `kv[l, 0]`, `v_buffers[l]` is `kv[l, 1]`, so one kernel launch can copy
pages of every layer (kvtransfer.staging). On CUDA `store` is one Triton launch for K and V
(kernels.kv_store); on CPU it is torch indexing.

A pool of one plane (`num_planes=1`, MLA's compressed KV) is `[num_layers, 1, ...]`: V is read out
of the stored K, so `v_buffers[l]` is `k_buffers[l]` (`kv[l, -1]` is V in both forms), `store`
writes only `k`, and every byte count (bytes_per_token, pages_for_budget, transfers) halves.

Page ids are the only currency: the radix cache, the allocator, the kernels and the transfer
backends all speak them, so a page moves between workers as one contiguous block. Page 0 is never
handed out by the allocator: padded page tables point at it and writes from padded rows land
there harmlessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPoolShape:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    num_planes: int = 2  # 2: K and V; 1: V read out of K (see the module docstring)

    def __post_init__(self) -> None:
        assert self.num_planes in (1, 2), f"num_planes must be 1 or 2: {self.num_planes}"

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K plus V for one token over all layers, per element byte."""
        return self.num_planes * self.num_layers * self.num_kv_heads * self.head_dim

    @staticmethod
    def pages_for_budget(
        budget_bytes: int,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        num_planes: int = 2,
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_page = num_planes * num_layers * page_size * num_kv_heads * head_dim * elem
        return max(0, budget_bytes // per_page)


class PagedKVPool:
    def __init__(self, shape: KVPoolShape, dtype: torch.dtype, device: torch.device | str):
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        dims = (
            shape.num_layers,
            shape.num_planes,
            shape.num_pages,
            shape.page_size,
            shape.num_kv_heads,
            shape.head_dim,
        )
        self.kv = torch.zeros(dims, dtype=dtype, device=self.device)
        self.k_buffers = [self.kv[layer, 0] for layer in range(shape.num_layers)]
        self.v_buffers = [self.kv[layer, -1] for layer in range(shape.num_layers)]

    @property
    def page_size(self) -> int:
        return self.shape.page_size

    @property
    def num_pages(self) -> int:
        return self.shape.num_pages

    @property
    def total_tokens(self) -> int:
        """Token capacity, not counting the reserved page 0."""
        return (self.shape.num_pages - 1) * self.shape.page_size

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()  # the buffers are views of kv

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k/v [T, kv_heads, head_dim] at flat slots [T] (page * page_size + offset).
        With one plane only `k` is stored (V is read out of it)."""
        if self.device.type == "cuda":
            # Imported here so that CPU-only processes never load Triton.
            from pdserve.kernels.kv_store import store_kv

            store_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], slots, k, v)
            return
        flat_k = self.k_buffers[layer_id].view(-1, self.shape.num_kv_heads, self.shape.head_dim)
        flat_v = self.v_buffers[layer_id].view(-1, self.shape.num_kv_heads, self.shape.head_dim)
        flat_k[slots] = k.to(self.dtype)
        if self.shape.num_planes == 2:
            flat_v[slots] = v.to(self.dtype)

    def gather(self, layer_id: int, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` tokens held in `pages` (in order): [length, kv_heads, head_dim]."""
        k = self.k_buffers[layer_id][pages].flatten(0, 1)[:length]
        v = self.v_buffers[layer_id][pages].flatten(0, 1)[:length]
        return k, v
