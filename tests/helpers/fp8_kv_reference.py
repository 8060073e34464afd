"""The reference an fp8 KV pool is checked against: the same engine with a float32 pool whose stores
round every K and V value through the fp8 format and back (quantize with the layer's scale, then
multiply by it). It holds in float32 exactly what an fp8 pool gives back when read, so the two
engines differ only in where the rounding lives."""

from __future__ import annotations

import torch

from pdserve.kernels.fp8_kv_format import dequantize_kv_ref, quantize_kv_ref
from pdserve.shared.engine.kv_pool import PagedKVPool


def fake_quantize_kv_stores(pool: PagedKVPool, fp8: torch.dtype, scales: torch.Tensor) -> None:
    """Makes the float32 `pool` store K/V fake-quantized to `fp8` with `scales` [layers, planes]."""
    assert pool.kv_scales is None, "the reference pool is a 16/32-bit one"
    store = pool.store

    def fake_quantized_store(layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k_scale, v_scale = scales[layer_id, :1], scales[layer_id, -1:]
        k_round = dequantize_kv_ref(quantize_kv_ref(k, k_scale, fp8), k_scale)
        v_round = dequantize_kv_ref(quantize_kv_ref(v, v_scale, fp8), v_scale)
        store(layer_id, slots, k_round, v_round)

    pool.store = fake_quantized_store  # type: ignore[method-assign]
