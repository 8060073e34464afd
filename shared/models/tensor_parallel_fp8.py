"""fp8 linears on a tensor-parallel rank: the row-parallel projections (o_proj, down_proj) in fp8.

Rules:
- Column-parallel slices (q/k/v, gate/up) are MergedLinears and become plain Fp8Linears: their
  per-channel scales are their own rows' (shared.models.fp8_linear).
- `Fp8RowParallelLinear` holds its input columns of every output row in e4m3 with the scales of
  the whole rows (fp8_checkpoint.py quantizes the whole tensor before the cut), so every rank's
  slice holds the same bits as the single-rank weight. Its input rows arrive split by columns too;
  each is quantized with its whole row's amax (a MAX all-reduce of one float per row), so the
  fp8 values multiplied are exactly one rank's; the partial products are summed across ranks
  (all-reduce) and the bias is added once after. TP=N then equals TP=1 up to the order of float32
  sums. The price is one small collective per row-parallel layer (SGLang quantizes each slice on
  its own and skips it, at the cost of fp8-sized logit differences between TP sizes).
- Which linears convert follows fp8_linear's rules (decoder layers only; what the checkpoint kept
  stays in its dtype as a RowParallelLinear).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from pdserve.kernels.fp8_quant import quant_fp8_by_amax_ref
from pdserve.shared.models.fp8_linear import Fp8Linear, convertible_linears, replace_each
from pdserve.shared.models.tensor_parallel_layers import RowParallelLinear


class Fp8RowParallelLinear(Fp8Linear):
    """y = all_reduce(x_slice @ dequant(W_slice)^T) + b: x arrives split along its last dim."""

    # never handed Fp8Rows: a slice's rows need the whole row's amax (shared.models.fp8_fused skips it)
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = x.reshape(-1, self.in_features)
        # each row is quantized with the whole row's amax, as on one rank: a slice's own would
        # round it differently and move logits by about fp8's own error (tokens then differ)
        amax = rows.abs().amax(dim=-1, keepdim=True).float()
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        q, scales = quant_fp8_by_amax_ref(rows, amax)
        out = self.gemm_quantized(q, scales, None)
        dist.all_reduce(out)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def _row_parallel(model: nn.Module, keep: Callable[[str], bool]) -> list[tuple[str, nn.Linear]]:
    return convertible_linears(model, keep, kinds=(RowParallelLinear,))


def fp8_row_parallel_for_checkpoint(model: nn.Module, keep: Callable[[str], bool]) -> int:
    """Swaps empty Fp8RowParallelLinears in before fp8 weights load; returns how many."""
    return replace_each(model, _row_parallel(model, keep), Fp8RowParallelLinear.like)


def quantize_row_parallel(model: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> int:
    """Converts the row-parallel linears from their weights (dummy weights: each rank its slice)."""
    return replace_each(model, _row_parallel(model, keep), Fp8RowParallelLinear.quantized)
