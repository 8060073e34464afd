"""The modules a tensor-parallel rank holds in place of the full ones, and their collectives.

Rules:
- A worker's ranks are the whole default process group (`torch.distributed`, gloo on CPU, nccl on
  CUDA), initialized before the model is built; `TPRank` names this process's place in it.
- `RowParallelLinear` holds its input columns' slice; the partial products are summed across ranks
  (all-reduce) and the bias, held whole by every rank, is added once after the sum.
- `VocabParallelEmbedding` holds rows [start, start + rows) of the (padded) vocabulary; ids outside
  them look up zeros, and the all-reduce leaves each token the one row that holds it (exact: every
  other term is 0).
- `ScaledVocabParallelEmbedding` multiplies the summed rows by the embedding's scale, as the full
  one does.
- `all_reduce_output` is a forward hook summing a module's partial output (an MoE block's routed
  and shared experts: one all-reduce per layer).
- `gather_logits` joins every rank's vocabulary slice of the logits and drops the padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TPRank:
    rank: int
    size: int

    @staticmethod
    def current() -> TPRank:
        """This process's rank in the default process group (which must be initialized)."""
        return TPRank(dist.get_rank(), dist.get_world_size())

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of the vocabulary each rank holds: the vocabulary padded to a multiple of the size."""
        return -(-vocab_size // self.size)


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_slice @ W_slice^T) + b: x arrives split along its last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + num_rows) of the embedding; see the module rules."""

    def __init__(
        self,
        start: int,
        num_rows: int,
        hidden_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.start = start
        self.num_rows = num_rows
        self.weight = nn.Parameter(torch.empty(num_rows, hidden_size, dtype=dtype, device=device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out)
        return out


class ScaledVocabParallelEmbedding(VocabParallelEmbedding):
    """The slice of a scaled embedding (Gemma's: times sqrt(hidden), rounded to the weight dtype)."""

    def __init__(
        self, start: int, num_rows: int, hidden_size: int, scale: float, dtype: torch.dtype | None = None
    ):
        super().__init__(start, num_rows, hidden_size, dtype=dtype)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.scale


def gather_logits(local: torch.Tensor, vocab_size: int, world_size: int) -> torch.Tensor:
    """[N, vocab] from every rank's [N, rows] slice (all ranks get them; only rank 0 samples)."""
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[:, :vocab_size]


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` any rank holds (a collective)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A forward hook that sums `module`'s partial output over the ranks (in place)."""
    dist.all_reduce(output)
    return output
