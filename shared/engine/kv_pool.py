"""The paged KV pool: per layer one K and one V tensor shaped [num_pages, page_size, kv_heads, head_dim].

All of them are views of one tensor `kv` [num_layers, 2 (K, V), num_pages, page_size, kv_heads,
head_dim]: `k_buffers[l]` is `kv[l, 0]`, `v_buffers[l]` is `kv[l, 1]`, so one kernel launch can copy
pages of every layer (kvtransfer.staging). On CUDA `store` is one Triton launch for K and V
(kernels.kv_store); on CPU it is torch indexing.

A pool of one plane (`num_planes=1`, MLA's compressed KV) is `[num_layers, 1, ...]`: V is read out
of the stored K, so `v_buffers[l]` is `k_buffers[l]` (`kv[l, -1]` is V in both forms), `store`
writes only `k`, and every byte count (bytes_per_token, pages_for_budget, transfers) halves.

An fp8 pool (`--kv-cache-dtype fp8_e4m3|fp8_e5m2`) stores K and V as float8 with one float32
scale per layer and plane, `kv_scales` [num_layers, num_planes] (K's, then V's; a one-plane pool
has one, read for both). `store` quantizes (kernels.fp8_kv: x / scale, clamped, rounded) and
`gather` hands back the dequantized values in float32; the Triton kernels take the scales as
views of `kv_scales`. An fp8 page holds a quarter of float32's bytes and half of bfloat16's, so
`pages_for_budget` gives twice the 16-bit token count for the same memory.

Page ids are the only currency: the radix cache, the allocator, the kernels and the transfer
backends all speak them, so a page moves between workers as one contiguous block. Page 0 is never
handed out by the allocator: padded page tables point at it and writes from padded rows land
there harmlessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels.fp8_kv_format import dequantize_kv_ref, is_fp8, quantize_kv_ref

_KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for `--kv-cache-dtype` (auto: the model's)."""
    if name == "auto":
        return model_dtype
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; expected auto, {', '.join(_KV_CACHE_DTYPES)}")
    return _KV_CACHE_DTYPES[name]


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
    """`kv_scales` (fp8 pools only): [num_layers, num_planes] float32, e.g. a checkpoint's; default 1.0."""

    def __init__(
        self,
        shape: KVPoolShape,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_scales: torch.Tensor | None = None,
    ):
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
        self.kv_scales: torch.Tensor | None = None
        if is_fp8(dtype):
            scales = torch.ones(shape.num_layers, shape.num_planes) if kv_scales is None else kv_scales
            assert scales.shape == (shape.num_layers, shape.num_planes), (scales.shape, shape)
            self.kv_scales = scales.to(device=self.device, dtype=torch.float32).contiguous()
        elif kv_scales is not None:
            raise ValueError(f"KV scales apply to an fp8 pool, not to {dtype}")

    def scales(self, layer_id: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One layer's (k_scale, v_scale) as one-element views of `kv_scales`, or (None, None)."""
        if self.kv_scales is None:
            return None, None
        return self.kv_scales[layer_id, :1], self.kv_scales[layer_id, -1:]

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

            store_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], slots, k, v, *self.scales(layer_id))
            return
        k_scale, v_scale = self.scales(layer_id)
        flat_k = self.k_buffers[layer_id].view(-1, self.shape.num_kv_heads, self.shape.head_dim)
        flat_v = self.v_buffers[layer_id].view(-1, self.shape.num_kv_heads, self.shape.head_dim)
        flat_k[slots] = quantize_kv_ref(k, k_scale, self.dtype)
        if self.shape.num_planes == 2:
            flat_v[slots] = quantize_kv_ref(v, v_scale, self.dtype)

    def gather(self, layer_id: int, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `length` tokens held in `pages` (in order): [length, kv_heads, head_dim];
        an fp8 pool's dequantized, in float32."""
        k = self.k_buffers[layer_id][pages].flatten(0, 1)[:length]
        v = self.v_buffers[layer_id][pages].flatten(0, 1)[:length]
        if self.kv_scales is None:
            return k, v
        k_scale, v_scale = self.scales(layer_id)
        return dequantize_kv_ref(k, k_scale), dequantize_kv_ref(v, v_scale)
