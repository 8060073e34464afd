"""Decode CUDA graphs: built for one process, or captured and replayed in step across TP ranks.

    graphs = build_decode_graphs(model, pool, backend, args, model_config, device, tp, step_sender)
    # rank 0 (or TP=1): graphs.fits(bs), graphs.replay(step, resolve_input_ids)
    # a follower, for each GraphStep it receives: replay_graph_step(graphs, step)

Without tensor parallelism the result is a plain DecodeGraphRunner, exactly as before. Under TP:

- Capture: every rank's ModelRunner builds its graphs in its constructor, so the ranks capture
  together; they first agree on the bucket order (`agree_on_capture_order`, a collective that also
  leaves the NCCL communicator warmed up: a communicator created inside a capture fails). Each
  bucket's eager warm-up forward runs the collectives before its capture. The graphs hold the
  all-reduces and the logits all-gather (`gather_logits`), so a replay returns the whole vocabulary.
  The capture is thread-local: the process group's watchdog thread queries its events meanwhile,
  which a global capture would count as an illegal call.
- Replay: rank 0 (`TPDecodeGraphs`) packs the step, sends it on the step channel as a GraphStep,
  then replays its bucket; a follower replays the bucket rank 0 chose (`follower_bucket`).
- Overlap scheduling: a token still in flight exists only on rank 0's device. Rank 0 resolves the
  placeholders in its static ids buffer after the host copy and broadcasts that buffer's rows over
  the process group (NCCL, stream-ordered, no host sync); a follower receives into the same buffer
  before its replay. One small broadcast per such step; a step without tokens in flight has none.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.cuda_graph_runner import (
    DecodeGraphRunner,
    DecodeInputs,
    capture_order,
    smallest_bucket,
)
from pdserve.shared.engine.kv_pool import PagedKVPool
from pdserve.shared.engine.startup_log import slow_step
from pdserve.shared.engine.tp_graph_step import GraphStep
from pdserve.shared.engine.tp_steps import StepSender
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import AttentionBackend
from pdserve.shared.models.tensor_parallel_layers import TPRank, gather_logits


class TPDecodeGraphs:
    """Rank 0's decode graphs under TP: each replay is sent to the followers first, who replay it too."""

    def __init__(self, graphs: DecodeGraphRunner, sender: StepSender):
        self.graphs = graphs
        self.sender = sender

    @property
    def buckets(self) -> list[int]:
        return self.graphs.buckets

    @property
    def max_bs(self) -> int:
        return self.graphs.max_bs

    def fits(self, batch_size: int) -> bool:
        return self.graphs.fits(batch_size)

    def replay(
        self, step: DecodeInputs, resolve_input_ids: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        meta, table = self.graphs.pack(step)
        self.sender.send_graph_step(GraphStep(meta, table, ids_from_rank0=resolve_input_ids is not None))
        if resolve_input_ids is None:
            return self.graphs.replay_packed(meta, table)
        return self.graphs.replay_packed(meta, table, partial(resolve_and_broadcast_ids, resolve_input_ids))


def resolve_and_broadcast_ids(resolve: Callable[[torch.Tensor], None], input_ids: torch.Tensor) -> None:
    """Rank 0: the in-flight ids into its graph's ids rows, then those rows to every rank."""
    resolve(input_ids)
    dist.broadcast(input_ids, src=0)


def receive_rank0_ids(input_ids: torch.Tensor) -> None:
    """A follower: rank 0's resolved ids over the placeholders it received."""
    dist.broadcast(input_ids, src=0)


def follower_bucket(step: GraphStep, buckets: list[int]) -> int:
    """The bucket a follower replays: the one rank 0 chose, which must be the smallest captured
    bucket that holds the step (as rank 0 picks it); anything else means the ranks' graphs differ."""
    if step.batch_size > buckets[-1] or smallest_bucket(buckets, step.batch_size) != step.bucket:
        raise ValueError(
            f"rank 0 replays bucket {step.bucket} for {step.batch_size} requests; this rank captured {buckets}"
        )
    return step.bucket


def replay_graph_step(graphs: DecodeGraphRunner, step: GraphStep) -> torch.Tensor:
    """A follower's replay of rank 0's graph step (its logits: rank 0 samples, the follower drops them)."""
    follower_bucket(step, graphs.buckets)
    return graphs.replay_packed(step.meta, step.table, receive_rank0_ids if step.ids_from_rank0 else None)


def agree_on_capture_order(order: list[int], tp: TPRank) -> None:
    """Every rank's capture order must be the same (a collective); a rank whose differs raises."""
    orders: list[list[int] | None] = [None] * tp.size
    dist.all_gather_object(orders, order)
    if any(o != order for o in orders):
        raise ValueError(f"CUDA graph capture orders differ across ranks: {orders}")


def build_decode_graphs(
    model: torch.nn.Module,
    pool: PagedKVPool,
    attn_backend: AttentionBackend,
    args: EngineArgs,
    model_config: ModelConfig,
    device: torch.device,
    tp: TPRank | None,
    step_sender: StepSender | None,
) -> DecodeGraphRunner | TPDecodeGraphs:
    """The captured decode graphs of this process (see the module docstring)."""
    graphs = DecodeGraphRunner(
        model,
        pool,
        attn_backend,
        max_bs=min(args.cuda_graph_max_bs, args.max_running_requests),
        max_pages_per_req=-(-model_config.context_length // args.page_size),
        device=device,
        compile_forward=args.enable_torch_compile,
        gather_logits=None if tp is None else partial(_gather_vocab, model_config.vocab_size, tp.size),
        capture_error_mode="global" if tp is None else "thread_local",
    )
    if tp is not None:
        agree_on_capture_order(capture_order(graphs.buckets), tp)
        torch.cuda.synchronize(device)
    with slow_step(f"capturing CUDA graphs (batch sizes up to {graphs.max_bs})"):
        graphs.capture()
    if step_sender is None:
        return graphs
    return TPDecodeGraphs(graphs, step_sender)


def _gather_vocab(vocab_size: int, world_size: int, local_logits: torch.Tensor) -> torch.Tensor:
    return gather_logits(local_logits, vocab_size, world_size)
