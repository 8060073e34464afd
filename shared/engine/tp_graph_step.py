"""The step-channel message of a decode step that replays a CUDA graph on every rank.

Rank 0 chose the graph bucket and packed the step's host rows (cuda_graph_runner.pack_decode_inputs);
a follower copies the same rows into its own graph's static buffers and replays the same bucket, so
the collectives captured in the graphs meet in the same order on every rank.

Wire form (tp_steps.py sends it on the step channel): one msgpack header
`{"graph_step": {"batch_size", "ids_from_rank0"}, "meta": shape, "table": shape}`, then the raw
frames of `meta` [4, bucket] int64 and `table` [bs, width] int32. The bucket is meta's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import torch


@dataclass
class GraphStep:
    """One graph-replayed decode step as rank 0 packed it.

    `ids_from_rank0`: some input ids are tokens still in flight on rank 0's device (overlap
    scheduling): the follower's rows hold placeholders there, and every rank takes rank 0's resolved
    ids through a device broadcast before the replay (tp_decode_graphs.py)."""

    meta: torch.Tensor  # [4, bucket] int64: ids, positions, slots, seq lens; padding rows zero
    table: torch.Tensor  # [bs, width] int32: each request's pages
    ids_from_rank0: bool

    @property
    def bucket(self) -> int:
        return int(self.meta.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.table.shape[0])


def encode_graph_step(step: GraphStep) -> list[Any]:
    """The message's frames: a header, then meta's and table's bytes."""
    header = {
        "graph_step": {"batch_size": step.batch_size, "ids_from_rank0": step.ids_from_rank0},
        "meta": list(step.meta.shape),
        "table": list(step.table.shape),
    }
    return [msgpack.packb(header), step.meta.contiguous().numpy(), step.table.contiguous().numpy()]


def decode_graph_step(header: dict[str, Any], frames: list[bytes]) -> GraphStep:
    """The GraphStep of a received header (already unpacked) and its two frames."""
    meta_frame, table_frame = frames
    meta = _host_tensor(meta_frame, torch.int64, header["meta"])
    table = _host_tensor(table_frame, torch.int32, header["table"])
    if table.shape[0] != header["graph_step"]["batch_size"] or table.shape[0] > meta.shape[1]:
        raise ValueError(f"graph step of {table.shape[0]} rows in a bucket of {meta.shape[1]}")
    return GraphStep(meta, table, bool(header["graph_step"]["ids_from_rank0"]))


def _host_tensor(frame: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not len(frame):  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(frame), dtype=dtype).reshape(shape)
