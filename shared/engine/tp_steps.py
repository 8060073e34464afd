"""Rank 0 to the follower ranks of a tensor-parallel worker: every forward pass's inputs.

Rank 0 owns the scheduler; a follower only runs the forward passes rank 0 runs, in the same order,
so each model collective meets its peers. Before its own forward, rank 0 sends the pass's
ForwardBatch tensors (token ids, positions, KV slots, lengths, page tables, logits rows); a follower
rebuilds the ForwardBatch over its own KV pool (the same page ids, its own heads) and runs it.

Why ZMQ and not a torch.distributed broadcast: a follower waits for the next pass as long as the
worker is idle (hours, maybe), and a collective that waits that long runs into the process group's
timeout (and NCCL's watchdog); a ZMQ receive waits at no cost. A rank that dies is noticed by the
supervision of the ranks (shared/launch/tp_ranks.py), not by a timeout.

Rules:
- `open_step_channel` is a collective: every rank calls it once, after its KV pool exists. Rank 0
  binds one PUSH socket per follower on loopback (ranks on several hosts: on node 0's
  --dist-init-addr host, `step_channel_host`) and broadcasts their addresses through the process
  group; follower r connects a PULL socket to the r-th.
- A message is a msgpack header (mode, host lengths, each tensor's dtype and shape) then one raw
  frame per tensor of `TENSOR_FIELDS`, in that order; or a control message (an admin operation
  every rank must do, such as `ReloadWeights`, or a step of a KV transfer: tp_kv_messages.py):
  one msgpack frame naming it (to every follower, or one message each with `send_control_each`).
  Followers act on it between passes, in the order rank 0 sent it; or a decode step that replays a
  CUDA graph on every rank (`GraphStep`, tp_graph_step.py).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import torch
import torch.distributed as dist
import zmq

from pdserve.shared.args import EngineArgs, split_host_port
from pdserve.shared.engine.tp_graph_step import GraphStep, decode_graph_step, encode_graph_step
from pdserve.shared.engine.tp_kv_messages import KV_CONTROL_MESSAGES
from pdserve.shared.models.forward_batch import AttentionBackend, ForwardBatch, ForwardMode, KVPool
from pdserve.shared.models.tensor_parallel_layers import TPRank

TENSOR_FIELDS = (
    "input_ids",
    "positions",
    "out_cache_loc",
    "prefix_lens",
    "extend_lens",
    "seq_lens",
    "extend_start_loc",
    "page_table",
    "logits_indices",
)
_DTYPES = {"int64": torch.int64, "int32": torch.int32}


@dataclass(frozen=True)
class ReloadWeights:
    """Control: every rank loads its slice of the checkpoint in `local_dir` (tp_weights.py)."""

    local_dir: str
    load_format: str


@dataclass(frozen=True)
class UpdateTensors:
    """Control: this follower's entry of `/update_weights_from_tensor` (tp_tensor_updates.py)."""

    entry: str | bytes
    load_format: str | None


@dataclass(frozen=True)
class ReadWeights:
    """Control: every rank hands rank 0 its part of a parameter's first rows (tp_weight_reads.py)."""

    name: str
    truncate_size: int


# the KV transfer's messages (tp_kv_messages.py) go on this channel too, in order with the passes
CONTROL_MESSAGES: dict[str, type] = {
    "reload_weights": ReloadWeights,
    "update_tensors": UpdateTensors,
    "read_weights": ReadWeights,
    **KV_CONTROL_MESSAGES,
}
_CONTROL_NAMES = {kind: name for name, kind in CONTROL_MESSAGES.items()}
ControlMessage = Any  # an instance of a CONTROL_MESSAGES type


class StepSender:
    """Rank 0's end: `send(batch)` before each forward pass."""

    def __init__(self, ctx: zmq.Context, num_followers: int, host: str = "127.0.0.1"):
        self.sockets = []
        for _ in range(num_followers):
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"tcp://{host}:0")
            self.sockets.append(sock)
        self.addresses = [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self.sockets]

    def send(self, batch: ForwardBatch) -> None:
        tensors = [getattr(batch, name).cpu().contiguous() for name in TENSOR_FIELDS]
        header: dict[str, Any] = {
            "mode": int(batch.mode),
            "prefix_lens": batch.prefix_lens_cpu,
            "extend_lens": batch.extend_lens_cpu,
            "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors],
        }
        self._send_frames([msgpack.packb(header), *(t.numpy() for t in tensors)])

    def send_control(self, message: ControlMessage) -> None:
        self._send_frames([self._control_frame(message)])

    def send_control_each(self, messages: list[ControlMessage]) -> None:
        """messages[i] to follower i + 1 (a message that differs per rank)."""
        if len(messages) != len(self.sockets):  # checked first: no follower may get one alone
            raise ValueError(f"{len(messages)} control messages for {len(self.sockets)} followers")
        for sock, message in zip(self.sockets, messages):
            sock.send_multipart([self._control_frame(message)], copy=False)

    @staticmethod
    def _control_frame(message: ControlMessage) -> bytes:
        return msgpack.packb({"control": _CONTROL_NAMES[type(message)], **asdict(message)})

    def send_graph_step(self, step: GraphStep) -> None:
        self._send_frames(encode_graph_step(step))

    def _send_frames(self, frames: list[Any]) -> None:
        for sock in self.sockets:
            sock.send_multipart(frames, copy=False)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class StepReceiver:
    """A follower's end: `receive(...)` the next pass or control message, or None when none came
    within the timeout."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.socket = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def receive(
        self, pool: KVPool, backend: AttentionBackend, device: torch.device, timeout_s: float
    ) -> ForwardBatch | ControlMessage | GraphStep | None:
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        header_frame, *frames = self.socket.recv_multipart()
        header = msgpack.unpackb(header_frame)
        if "control" in header:
            return CONTROL_MESSAGES[header.pop("control")](**header)
        if "graph_step" in header:
            return decode_graph_step(header, frames)
        tensors = {}
        for name, (dtype, shape), frame in zip(TENSOR_FIELDS, header["tensors"], frames):
            host = (
                torch.frombuffer(bytearray(frame), dtype=_DTYPES[dtype])
                if len(frame)
                else torch.empty(0, dtype=_DTYPES[dtype])  # frombuffer refuses an empty buffer
            )
            tensors[name] = host.reshape(shape).to(device)
        return ForwardBatch(
            mode=ForwardMode(header["mode"]),
            kv_pool=pool,
            attn_backend=backend,
            prefix_lens_cpu=header["prefix_lens"],
            extend_lens_cpu=header["extend_lens"],
            **tensors,
        )

    def close(self) -> None:
        self.socket.close()


def step_channel_host(args: EngineArgs) -> str:
    """Where rank 0 binds the step channel: loopback on one host; across hosts, the address of node 0
    that every node already dials for the rendezvous (the --dist-init-addr host)."""
    if args.nnodes == 1 or args.dist_init_addr is None:
        return "127.0.0.1"
    return socket.gethostbyname(split_host_port(args.dist_init_addr)[0])


def step_ends(rank: TPRank | None, host: str = "127.0.0.1") -> tuple[StepSender | None, StepReceiver | None]:
    """(sender, receiver) of this rank: rank 0 sends, a follower receives, no TP has neither."""
    if rank is None:
        return None, None
    channel = open_step_channel(rank, zmq.Context(), host)
    return (channel, None) if isinstance(channel, StepSender) else (None, channel)


def open_step_channel(rank: TPRank, ctx: zmq.Context, host: str = "127.0.0.1") -> StepSender | StepReceiver:
    """Rank 0's sender or this follower's receiver (a collective: see the module rules)."""
    sender = StepSender(ctx, rank.size - 1, host) if rank.rank == 0 else None
    addresses: list[Any] = [sender.addresses if sender is not None else None]
    dist.broadcast_object_list(addresses, src=0)
    return sender if sender is not None else StepReceiver(ctx, addresses[0][rank.rank - 1])
