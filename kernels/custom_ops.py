"""The model-forward kernels as torch custom ops (`torch.ops.pdserve.*`), opaque to torch.compile.

Why: traced as plain Triton launches, inductor functionalized the kernels that write the KV pool
and allocated a copy of the whole pool around them (22.6 GiB for an 8B model, bench/RESULTS.md).
A custom op whose schema names what it writes (`Tensor(a!)`) stays one in-place call in the graph.

Rules:
- Ops that touch the KV pool take the pool's single tensor `kv` [layers, 2, pages, page_size,
  kv_heads, head_dim] and a layer index, never the per-layer views: views of one base handed in
  as separate graph inputs make torch.compile build a "synthetic base" and copy it. V is
  `kv[layer, -1]`: the second plane, or the only one of a one-plane pool (V read out of K).
- An fp8 pool's scales travel the same way: `kv_scales` [layers, planes] float32 (or None for a
  16-bit pool), K's scale `kv_scales[layer, 0]` and V's `kv_scales[layer, -1]`; tensors, so a
  CUDA graph reads them at replay and torch.compile never specializes on their values.
- An op returns either nothing (it writes its `!` arguments) or new tensors: a custom op may not
  return its inputs. The `*_` names write in place; wrappers that return the written tensors stay
  with the callers (shared.models.fast_path).
- Every op has a fake implementation that allocates its outputs with the shapes, dtypes and
  strides of the real one (inductor checks strides).
- Registered through `torch.library.Library` rather than `torch.library.custom_op`: the latter's
  Python wrapper costs ~20 us per call on a slow host against ~2 us here, and the eager fast path
  (prefill, decode batches above the captured sizes) calls these ~7 times per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.kernels.activation import silu_and_mul as _silu_and_mul
from pdserve.kernels.decode_attention import decode_attention as _decode_attention
from pdserve.kernels.extend_attention import extend_attention as _extend_attention
from pdserve.kernels.fp8_gemm import fp8_gemm as _fp8_gemm
from pdserve.kernels.fp8_quant import per_token_quant_fp8 as _per_token_quant_fp8
from pdserve.kernels.fused_moe import fused_moe as _fused_moe
from pdserve.kernels.gelu_and_mul import gelu_and_mul as _gelu_and_mul
from pdserve.kernels.gemma_rmsnorm import gemma_fused_add_rmsnorm as _gemma_fused_add_rmsnorm
from pdserve.kernels.gemma_rmsnorm import gemma_rmsnorm as _gemma_rmsnorm
from pdserve.kernels.kv_store import store_kv as _store_kv
from pdserve.kernels.moe_routing import moe_routing as _moe_routing
from pdserve.kernels.rmsnorm import fused_add_rmsnorm as _fused_add_rmsnorm
from pdserve.kernels.rmsnorm import rmsnorm as _rmsnorm
from pdserve.kernels.rmsnorm_fp8 import fused_add_rmsnorm_fp8 as _fused_add_rmsnorm_fp8
from pdserve.kernels.rmsnorm_fp8 import rmsnorm_fp8 as _rmsnorm_fp8
from pdserve.kernels.rope import apply_rotary as _apply_rotary
from pdserve.kernels.rope import rotary_store_kv as _rotary_store_kv
from pdserve.kernels.shared_expert_gate import add_gated_shared_expert as _add_gated_shared_expert
from pdserve.kernels.silu_mul_fp8 import silu_mul_fp8 as _silu_mul_fp8

_LIB = torch.library.Library("pdserve", "FRAGMENT")


def _register(fn: Callable, mutates_args: tuple[str, ...], fake: Callable) -> torch._ops.OpOverload:
    """Defines `pdserve::<fn name>` from fn's type hints; returns the op to call."""
    name = fn.__name__
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")  # one Python impl for CPU and CUDA
    _LIB._register_fake(name, fake)
    return getattr(torch.ops.pdserve, name).default


def _no_output(*args, **kwargs) -> None:
    return None


def _new_like(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as the real ops allocate their outputs


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm(x, weight, eps)


def fused_add_rmsnorm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    _fused_add_rmsnorm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _silu_and_mul(x)


def gemma_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _gemma_rmsnorm(x, weight, eps)


def gemma_fused_add_rmsnorm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    _gemma_fused_add_rmsnorm(x, residual, weight, eps)


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gelu_and_mul(x)


def rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
) -> None:
    _apply_rotary(q, k, positions, inv_freq, attention_scaling)


def _layer_scales(
    kv_scales: torch.Tensor | None, layer: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if kv_scales is None:
        return None, None
    return kv_scales[layer, :1], kv_scales[layer, -1:]


def store_kv_(
    kv: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    _store_kv(kv[layer, 0], kv[layer, -1], slots, k, v, *_layer_scales(kv_scales, layer))


def rotary_store_kv_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    kv: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    _rotary_store_kv(
        q, k, v, positions, inv_freq, attention_scaling, kv[layer, 0], kv[layer, -1], slots,
        *_layer_scales(kv_scales, layer),
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_kv_splits: int,
    workspace: torch.Tensor,
    window: int = 0,
    softcap: float = 0.0,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    # window 0 and softcap 0.0 stand for None: a schema has no optional scalars worth their cost
    out = q.new_empty(q.shape)
    k_scale, v_scale = _layer_scales(kv_scales, layer)
    return _decode_attention(
        q, kv[layer, 0], kv[layer, -1], page_table, seq_lens, scale, out, num_kv_splits, workspace,
        window=window or None, softcap=softcap or None, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


def extend_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    max_extend_len: int,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    out = q.new_empty(q.shape)
    k_scale, v_scale = _layer_scales(kv_scales, layer)
    return _extend_attention(
        q, kv[layer, 0], kv[layer, -1], page_table, seq_lens, extend_lens, extend_start_loc,
        max_extend_len, scale, out, window=window or None, softcap=softcap or None,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int = 0,
    shared: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    return _fused_moe(
        hidden,
        w13,
        w2,
        topk_weights,
        topk_ids,
        expert_offset=expert_offset,
        shared=shared,
        shared_gate=shared_gate,
    )


def fused_moe_fp8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_offset: int = 0,
    shared: torch.Tensor | None = None,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    return _fused_moe(
        hidden,
        w13,
        w2,
        topk_weights,
        topk_ids,
        expert_offset=expert_offset,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
        shared=shared,
        shared_gate=shared_gate,
    )


def moe_routing(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, round_to: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 weights: what fused_moe reads, so no cast runs between the two
    return _moe_routing(router_logits, top_k, renormalize, torch.float32, round_to)


def add_gated_shared_expert(
    routed: torch.Tensor, shared: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    return _add_gated_shared_expert(routed, shared, gate_logits)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token_quant_fp8(x)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _fp8_gemm(a, a_scale, w, w_scale, bias, out_dtype)


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rmsnorm_fp8(x, weight, eps)


def fused_add_rmsnorm_fp8_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_add_rmsnorm_fp8(x, residual, weight, eps)


def silu_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _silu_mul_fp8(x)


def _per_token_quant_fp8_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _norm_fp8_fake(x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token_quant_fp8_fake(x)


def _silu_mul_fp8_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_token_quant_fp8_fake(x.new_empty((x.shape[0], x.shape[1] // 2)))


def _fp8_gemm_fake(a, a_scale, w, w_scale, bias, out_dtype) -> torch.Tensor:
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def _moe_routing_fake(
    router_logits: torch.Tensor, top_k: int, *args, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (router_logits.shape[0], top_k)
    weights = router_logits.new_empty(shape, dtype=torch.float32)
    return weights, router_logits.new_empty(shape, dtype=torch.int32)


def _silu_and_mul_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1] // 2))


rmsnorm_op = _register(rmsnorm, (), _new_like)
fused_add_rmsnorm_op = _register(fused_add_rmsnorm_, ("x", "residual"), _no_output)
silu_and_mul_op = _register(silu_and_mul, (), _silu_and_mul_fake)
gemma_rmsnorm_op = _register(gemma_rmsnorm, (), _new_like)
gemma_fused_add_rmsnorm_op = _register(gemma_fused_add_rmsnorm_, ("x", "residual"), _no_output)
gelu_and_mul_op = _register(gelu_and_mul, (), _silu_and_mul_fake)  # the same [T, 2I] -> [T, I]
rotary_op = _register(rotary_, ("q", "k"), _no_output)
store_kv_op = _register(store_kv_, ("kv",), _no_output)
rotary_store_kv_op = _register(rotary_store_kv_, ("q", "k", "kv"), _no_output)
decode_attention_op = _register(decode_attention, ("workspace",), _new_like)
extend_attention_op = _register(extend_attention, (), _new_like)
fused_moe_op = _register(fused_moe, (), _new_like)
fused_moe_fp8_op = _register(fused_moe_fp8, (), _new_like)
moe_routing_op = _register(moe_routing, (), _moe_routing_fake)
add_gated_shared_expert_op = _register(add_gated_shared_expert, (), _new_like)
per_token_quant_fp8_op = _register(per_token_quant_fp8, (), _per_token_quant_fp8_fake)
fp8_gemm_op = _register(fp8_gemm, (), _fp8_gemm_fake)
rmsnorm_fp8_op = _register(rmsnorm_fp8, (), _norm_fp8_fake)
fused_add_rmsnorm_fp8_op = _register(fused_add_rmsnorm_fp8_, ("residual",), _norm_fp8_fake)
silu_mul_fp8_op = _register(silu_mul_fp8, (), _silu_mul_fp8_fake)
