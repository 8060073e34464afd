"""Expert-distribution recording (`--expert-distribution-recorder-mode stat`), SGLang's stat mode.

    recorder = attach_expert_recorder(model, args, num_layers, device)   # None: mode off, or dense
    recorder.start()                          # /start_expert_distribution_record: reset, record
    recorder.begin_forward(num_real_tokens)   # the model runner, around every forward pass
    ... forward: each MoE layer calls recorder.on_select_experts(layer_id, topk_ids) ...
    recorder.end_forward()
    recorder.stop()                           # /stop_expert_distribution_record
    path = recorder.dump(dump_id, label)      # /dump_expert_distribution_record: write, reset

What is counted: while recording, every token of a forward pass (prefill chunks and decode
steps alike) adds 1 to (layer, expert) for each of its top-k experts in each MoE layer: a pass
of T tokens adds T * k to each MoE layer's row. Dense layers' rows stay 0. The rows of a CUDA
graph's padding (bucket size - batch size) are never counted: the count is masked by a device
scalar holding the pass's real token count (0 while not recording), so the captured graph needs
no host decision.

What the dump writes, as SGLang 0.5's `_StatAccumulator` does (python/sglang/srt/eplb/
expert_distribution.py): `torch.save` of `{"rank": 0, "logical_count": int32 tensor
[buffer_size, num_layers, num_experts], "average_utilization_rate_over_window": None}` into
`$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR` (default /tmp, created when missing). `logical_count`
holds one row per forward pass in a circular buffer of `--expert-distribution-recorder-buffer-size`
passes (SGLang's default 1000; -1 grows without bound), rows of passes not run being 0, so
`logical_count.sum(0)` is the distribution. The file is named `expert_distribution_recorder_
<time>.pt` in SGLang; here every worker writes its own, `expert_distribution_recorder_<time>_
<worker>.pt` (SGLang's per-rank form), <time> being the one dump id the router gives all workers.
The recorder resets after a dump, as SGLang's does. Only "stat" is offered (SGLang's other modes
record per token or per pass for EPLB, which pdserve lacks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from pdserve.shared.args import EngineArgs
from pdserve.shared.models.moe_block import SparseMoeBlock

logger = logging.getLogger(__name__)

RECORDER_MODES = ("stat",)
DIR_ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
DEFAULT_DIR = "/tmp"


class PassCountBuffer:
    """Per-pass counts [n, layers, experts] int32: circular over `size` passes, or growing (-1)."""

    def __init__(self, size: int, item_shape: tuple[int, int], device: torch.device):
        self._growing = size < 0
        self._data = torch.zeros(
            (128 if self._growing else size, *item_shape), dtype=torch.int32, device=device
        )
        self._next = 0

    def append(self, counts: torch.Tensor) -> None:
        if self._growing and self._next == len(self._data):
            self._data = torch.cat([self._data, torch.zeros_like(self._data)])
        self._data[self._next].copy_(counts)
        self._next = self._next + 1 if self._growing else (self._next + 1) % len(self._data)

    def all(self) -> torch.Tensor:
        return self._data[: self._next] if self._growing else self._data

    def reset(self) -> None:
        self._data.zero_()
        self._next = 0


class ExpertDistributionRecorder:
    def __init__(self, num_layers: int, num_experts: int, device: torch.device, buffer_size: int = 1000):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.recording = False
        # Written in place only: a captured CUDA graph holds their addresses.
        self._pass_counts = torch.zeros((num_layers, num_experts), dtype=torch.int32, device=device)
        self._real_tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._passes = PassCountBuffer(buffer_size, (num_layers, num_experts), device)

    def on_select_experts(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        """Adds this layer's choices of the pass's real tokens (device ops only)."""
        tokens, k = topk_ids.shape
        rows = torch.arange(tokens, device=topk_ids.device)
        counted = (rows < self._real_tokens).to(torch.int32)
        self._pass_counts[layer_id].scatter_add_(0, topk_ids.reshape(-1), counted.repeat_interleave(k))

    def begin_forward(self, num_real_tokens: int) -> None:
        """Before a forward pass: its first `num_real_tokens` rows count (none while not recording)."""
        self._real_tokens.fill_(num_real_tokens if self.recording else 0)

    def end_forward(self) -> None:
        """After a forward pass: its counts become one row of the buffer."""
        if self.recording:
            self._passes.append(self._pass_counts)
            self._pass_counts.zero_()

    def reset(self) -> None:
        self._pass_counts.zero_()
        self._passes.reset()

    def start(self) -> None:
        if self.recording:
            logger.warning("expert distribution recording was already on; it starts over")
        logger.info("Resetting expert distribution record...")
        self.reset()
        self.recording = True

    def stop(self) -> None:
        if not self.recording:
            logger.warning("expert distribution recording was not on")
        self.recording = False

    def logical_count(self) -> torch.Tensor:
        """[passes, layers, experts] int32 on the CPU (see the module docstring)."""
        return self._passes.all().cpu()

    def dump(self, dump_id: str, label: str, output_dir: str | None = None) -> Path:
        """Writes the record (SGLang's stat-mode file) and resets; returns the file's path."""
        save_dir = Path(output_dir or os.environ.get(DIR_ENV) or DEFAULT_DIR)
        save_dir.mkdir(parents=True, exist_ok=True)
        path = save_dir / f"expert_distribution_recorder_{dump_id}_{label}.pt"
        output = {
            "rank": 0,
            "logical_count": self.logical_count(),
            "average_utilization_rate_over_window": None,
        }
        torch.save(output, str(path))
        logger.info("Write expert distribution to %s", path)
        self.reset()
        return path


def attach_expert_recorder(
    model: nn.Module, args: EngineArgs, num_layers: int, device: torch.device
) -> ExpertDistributionRecorder | None:
    """A recorder observing every MoE block of `model` when the mode is on; None otherwise."""
    if args.expert_distribution_recorder_mode is None:
        return None
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if not blocks:
        logger.warning("--expert-distribution-recorder-mode is set but the model has no MoE layers")
        return None
    num_experts = blocks[0].experts.num_experts
    recorder = ExpertDistributionRecorder(
        num_layers, num_experts, device, args.expert_distribution_recorder_buffer_size
    )
    for block in blocks:
        block.observer = recorder
    return recorder
