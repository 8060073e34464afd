"""fp8 linear layers: e4m3 weights with per-output-channel scales, activations scaled per token.

Rules:
- `Fp8Linear` holds `weight` [N, K] float8_e4m3fn, `weight_scale` [N] float32 and an optional
  `bias` in the model dtype. Its forward quantizes each input row on the fly (kernels.fp8_quant:
  dynamic per-token scales, so no calibration is needed and an outlier token costs only its own
  row's precision), multiplies in fp8 with float32 accumulation and scales the result back.
- `forward` also takes `Fp8Rows` (rows a fused kernel already quantized exactly so) and skips its
  own quantization.
- GEMM: torch._scaled_mm (cuBLASLt on CUDA; also CPU) for most shapes; on CUDA a Triton kernel
  (kernels.fp8_gemm) for the skinny M of decode batches, where it reads the weights faster, and for
  layers whose dims are not multiples of 16 (which cuBLASLt refuses). The rows are quantized by
  their own launch: quantizing inside the GEMM redoes a row's quantization in every program of the
  grid, 5x slower on an H100 at M = 1 (bench/RESULTS.md).
- A MergedLinear becomes an Fp8Linear with the same `shards`: the per-channel scales of a
  checkpoint's q/k/v (or gate/up) land in their rows, and a per-tensor scale fills its shard's rows.
- `quantize_linears(model)` converts, in place, the linears of the decoder layers (attention and
  MLP projections) from their loaded weights; `fp8_linears_for_checkpoint(model)` swaps in empty
  Fp8Linears before an fp8 checkpoint is loaded into them. Both leave alone the embeddings, the
  lm_head, heads outside the layers, MoE routers (tiny, and a rounding there changes which expert
  a token goes to), MLA's kv_b_proj (read as a weight) and whatever `keep(name)` says the checkpoint kept in its own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from pdserve.kernels.fp8_quant import per_channel_quant_fp8, per_token_quant_fp8_ref
from pdserve.shared.models.layers import MergedLinear

# Decode batches up to this many rows take the Triton GEMM on CUDA (bench_fp8_gemm picks it).
SKINNY_M = 16
# Linears inside the decoder layers that stay in the model dtype: MoE routers, and MLA's kv_b_proj,
# whose weight the absorbed attention reads per head rather than calling it.
_KEPT = frozenset({"gate", "shared_expert_gate", "kv_b_proj"})


class Fp8Rows(NamedTuple):
    """Rows already quantized for an Fp8Linear (by the kernel that produced them, see
    shared.models.fp8_fused): q [M, K] float8_e4m3fn and their float32 scales [M, 1], as
    kernels.fp8_quant's per-token quantization gives them."""

    q: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """The shape of the rows they stand for: modules between the producer and the linear
        read `hidden.shape` as they would of the 16-bit tensor."""
        return self.q.shape


def quantize_rows(rows: torch.Tensor) -> Fp8Rows:
    """rows [M, K] quantized per token: the Triton launch on CUDA, the torch reference elsewhere."""
    if rows.device.type == "cuda":
        from pdserve.kernels.custom_ops import per_token_quant_fp8_op

        return Fp8Rows(*per_token_quant_fp8_op(rows))
    return Fp8Rows(*per_token_quant_fp8_ref(rows))


class Fp8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        shards: dict[str, tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = dtype
        self.shards = dict(shards or {})
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear) -> Fp8Linear:
        """An empty Fp8Linear (or subclass) of linear's shape (on linear's device; meta stays meta)."""
        with torch.device(linear.weight.device):
            return cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                linear.weight.dtype,
                getattr(linear, "shards", None),
            )

    @classmethod
    @torch.no_grad()
    def quantized(cls, linear: nn.Linear) -> Fp8Linear:
        fp8 = cls.like(linear)
        weight, scale = per_channel_quant_fp8(linear.weight.data)
        fp8.weight.data = weight
        fp8.weight_scale.data = scale
        if linear.bias is not None:
            fp8.bias.data = linear.bias.data  # type: ignore[union-attr]
        return fp8

    def named_checkpoint_targets(self, module_name: str) -> dict[str, tuple[nn.Parameter, slice | None]]:
        """Checkpoint names -> (parameter, rows): a merged layer answers to its shards' names."""
        params = [("weight", self.weight), ("weight_scale", self.weight_scale)]
        if self.bias is not None:
            params.append(("bias", self.bias))
        if not self.shards:
            return {f"{module_name}.{attr}": (p, None) for attr, p in params}
        parent = module_name.rpartition(".")[0]
        return {
            f"{parent}.{shard}.{attr}" if parent else f"{shard}.{attr}": (p, slice(offset, offset + size))
            for shard, (offset, size) in self.shards.items()
            for attr, p in params
        }

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        return self.gemm(x, self.bias)

    def gemm(self, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ dequant(weight)^T + bias: x's rows quantized per token on the fly, or already (Fp8Rows)."""
        rows = x if isinstance(x, Fp8Rows) else quantize_rows(x.reshape(-1, self.in_features))
        if rows.q.device.type == "cuda" and rows.q.shape[0] <= SKINNY_M:
            from pdserve.kernels.custom_ops import fp8_gemm_op

            out = fp8_gemm_op(rows.q, rows.scales, self.weight, self.weight_scale, bias, self.out_dtype)
        else:
            out = self.gemm_quantized(rows.q, rows.scales, bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def gemm_quantized(
        self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """[M, out] from rows q [M, K] in e4m3 with their float32 scales [M, 1]."""
        # cuBLASLt's fp8 GEMM takes only dims that are multiples of 16
        if q.device.type == "cuda" and (self.in_features % 16 or self.out_features % 16):
            from pdserve.kernels.custom_ops import fp8_gemm_op

            return fp8_gemm_op(q, scales, self.weight, self.weight_scale, bias, self.out_dtype)
        return torch._scaled_mm(
            q,
            self.weight.t(),
            scale_a=scales,
            scale_b=self.weight_scale[None, :],
            bias=bias,
            out_dtype=self.out_dtype,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel"


def convertible_linears(
    model: nn.Module, keep: Callable[[str], bool], kinds: tuple[type, ...] = (nn.Linear, MergedLinear)
) -> list[tuple[str, nn.Linear]]:
    """The decoder layers' linears of exactly the types `kinds` that become fp8 (see the rules)."""
    found = []
    for name, module in model.named_modules():
        if type(module) not in kinds or ".layers." not in f".{name}":
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in _KEPT:
            continue
        names = [f"{parent}.{s}" for s in module.shards] if isinstance(module, MergedLinear) else [name]
        kept = [n for n in names if keep(n)]
        if kept and len(kept) != len(names):
            raise ValueError(f"the checkpoint keeps {kept} unquantized but not the rest of {name}")
        if not kept:
            found.append((name, module))
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def replace_each(model: nn.Module, found: list[tuple[str, Any]], make: Callable[[Any], nn.Module]) -> int:
    """Puts make(module) in each found module's place, one at a time (so converting from loaded
    weights peaks at the model plus one module); returns how many."""
    for name, module in found:
        _replace(model, name, make(module))
    return len(found)


def quantize_linears(model: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> int:
    """Converts the decoder layers' linears to fp8 from their weights; returns how many."""
    return replace_each(model, convertible_linears(model, keep), Fp8Linear.quantized)


def fp8_linears_for_checkpoint(model: nn.Module, keep: Callable[[str], bool]) -> int:
    """Swaps empty Fp8Linears in where an fp8 checkpoint holds fp8 weights; returns how many."""
    return replace_each(model, convertible_linears(model, keep), Fp8Linear.like)
