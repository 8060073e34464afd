"""A decode step launched on the device whose sampled token ids the host has not read yet.

Overlap scheduling (batch_pipeline.py) launches decode step N before reading step N-1's tokens:

    launched = runner.launch(batch_n, futures=previous.future_ids())   # no host sync
    tokens = runner.collect(previous)                                   # waits for step N-1 only

Two things make that possible without the host waiting for the device:

- `FutureTokenIds`: a request in both steps reads, as step N's input, the token step N-1 samples
  for it, known only on the device. The host writes the placeholder -(row + 1) into step N's input
  ids (row: the request's row in step N-1's sampled ids); `resolve` swaps each placeholder for that
  id on the device, after the inputs were copied there and before the forward runs. Real ids are
  never negative, so placeholders and ids do not mix.
- `LaunchedDecode`: the sampled ids stay on the device (for the futures of the next step) and are
  copied to pinned host memory without blocking, with an event recorded after the copy; `token_ids`
  waits for that event alone, never for work launched after it.

- `DecodeForward`: a decode step can be launched in two halves, the forward (which needs no
  token of the step before it) and the sampling. A step with constrained rows launches its
  forward on the futures, reads the step before (whose tokens are ready while this forward runs),
  advances the matchers over them and only then launches its sampling with their bitmask.

Rules: `logits` is valid until the next launch (CUDA graphs replay into one output buffer), so a
step whose logprobs must be read is collected before the next launch. On the CPU every call runs
to completion; the same code then only changes the order in which the host does things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampler import SamplingInputs
from pdserve.shared.engine.scheduled_batch import ScheduledBatch


class FutureTokenIds:
    """The ids one launched decode step samples, as the next step's inputs (see the module docstring)."""

    def __init__(self, reqs: Sequence[Req], next_ids: torch.Tensor):
        self._row_of = {req: row for row, req in enumerate(reqs)}  # Req hashes by identity
        self._next_ids = next_ids

    def placeholder(self, req: Req) -> int:
        """The input id that stands for req's token sampled by the launched step."""
        row = self._row_of.get(req)
        if row is None:
            raise ValueError(f"request {req.rid} has a token in flight but is not in the launched step")
        return -(row + 1)

    def resolve(self, input_ids: torch.Tensor) -> None:
        """Replaces the placeholders in input_ids (int64, on the ids' device) in place, no host sync."""
        rows = (-input_ids - 1).clamp_(0, self._next_ids.numel() - 1)
        input_ids.copy_(torch.where(input_ids < 0, self._next_ids[rows], input_ids))


@dataclass
class DecodeForward:
    """A decode step whose forward is launched and whose sampling is not (ModelRunner.launch_sampling).
    `inputs` were read before the step was recorded as launched, so their counts are this step's;
    its token bitmask is filled when the sampling launches."""

    batch: ScheduledBatch
    logits: torch.Tensor  # [B, V]; valid until the next launch
    inputs: SamplingInputs


@dataclass
class LaunchedDecode:
    """One decode step launched by ModelRunner.launch; ModelRunner.collect reads it."""

    batch: ScheduledBatch
    logits: torch.Tensor  # [B, V]; valid until the next launch
    inputs: SamplingInputs
    next_ids: torch.Tensor  # [B] int64 on the device, one per request of the batch
    host_ids: torch.Tensor  # [B] int64 on the host: next_ids once `copied` has completed
    copied: torch.cuda.Event | None  # None on the CPU (host_ids is next_ids)

    @classmethod
    def of(
        cls, batch: ScheduledBatch, logits: torch.Tensor, inputs: SamplingInputs, next_ids: torch.Tensor
    ) -> LaunchedDecode:
        """Starts the copy of next_ids to the host without waiting for it."""
        if next_ids.device.type != "cuda":
            return cls(batch, logits, inputs, next_ids, next_ids, None)
        host_ids = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
        host_ids.copy_(next_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(batch, logits, inputs, next_ids, host_ids, copied)

    @property
    def wants_logprobs(self) -> bool:
        return any(self.inputs.return_logprob)

    def future_ids(self) -> FutureTokenIds:
        return FutureTokenIds(self.batch.reqs, self.next_ids)

    def token_ids(self) -> list[int]:
        """The sampled ids on the host; waits for this step's copy only."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_ids.tolist()
