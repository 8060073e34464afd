"""A follower rank of a tensor-parallel worker: the model's forward passes, nothing else.

Life: build the rank's ModelRunner (its slice of the weights, its heads' KV pool, the same pages as
rank 0; the collectives of that construction meet rank 0's engine building its own), then loop:
receive a pass from rank 0 (tp_steps.py), run it (its collectives meet rank 0's), drop the
logits (rank 0 samples); a decode step that fits a CUDA graph comes as a GraphStep and replays the
bucket rank 0 chose (tp_decode_graphs.py); a control message between passes is an admin operation
every rank does (a weight update: tp_weights.py, tp_tensor_updates.py; a weight read:
tp_weight_reads.py; a KV transfer's step: tp_kv_follower.py), dispatched by its type. No
scheduler, no sockets to clients, no sampling.
It returns when `keep_going()` turns false (checked whenever no pass came for `poll_s`): its
launcher asks whether rank 0 is still there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.cuda_graph_runner import DecodeGraphRunner
from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.tp_decode_graphs import replay_graph_step
from pdserve.shared.engine.tp_graph_step import GraphStep
from pdserve.shared.engine.tp_kv_follower import FollowerKV, follower_heads
from pdserve.shared.engine.tp_steps import ReadWeights, ReloadWeights, UpdateTensors
from pdserve.shared.engine.tp_tensor_updates import follow_tensor_update
from pdserve.shared.engine.tp_weight_reads import follow_weight_read
from pdserve.shared.engine.tp_weights import follow_reload
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch
from pdserve.shared.models.resolver import resolve_model

logger = logging.getLogger(__name__)


def follow_graph_step(runner: ModelRunner, step: GraphStep) -> None:
    """Replays the graph step rank 0 sent (the logits are rank 0's to sample)."""
    if not isinstance(runner.graphs, DecodeGraphRunner):
        raise TypeError("rank 0 replays a CUDA graph but this rank captured none")
    replay_graph_step(runner.graphs, step)


CONTROL_HANDLERS: dict[type, Callable[[ModelRunner, Any], None]] = {
    ReloadWeights: follow_reload,
    UpdateTensors: follow_tensor_update,  # tp_tensor_updates.py
    ReadWeights: follow_weight_read,  # tp_weight_reads.py
    GraphStep: follow_graph_step,
}


def build_follower_runner(args: EngineArgs) -> ModelRunner:
    """The follower's runner, built as rank 0's engine builds its own."""
    resolved = resolve_model(args.model_path)
    config = ModelConfig.from_path(
        resolved.local_dir,
        dtype=args.dtype,
        device=args.device,
        context_length=args.context_length,
        trust_remote_code=args.trust_remote_code,
    )
    return ModelRunner(args, config, resolved.local_dir)


def serve_follower(runner: ModelRunner, keep_going: Callable[[], bool], poll_s: float = 1.0) -> int:
    """Runs rank 0's passes until `keep_going()` is false; returns how many ran."""
    receiver = runner.step_receiver
    assert receiver is not None, "serve_follower needs a follower rank's runner"
    assert runner.tp is not None
    kv = FollowerKV(
        runner.pool, runner.tp.rank, follower_heads(runner.pool, runner.tp, runner.config.num_kv_heads)
    )
    handlers = {kind: partial(handle, runner) for kind, handle in CONTROL_HANDLERS.items()} | kv.handlers()
    passes = 0
    try:
        while True:
            batch = receiver.receive(runner.pool, runner.attn_backend, runner.device, kv.poll_s(poll_s))
            if batch is None:
                kv.pump()
                if not keep_going():
                    logger.info("tensor-parallel follower stops after %d forward passes", passes)
                    return passes
                continue
            if isinstance(batch, ForwardBatch):
                runner.forward_logits(batch)
                passes += 1
            else:
                handlers[type(batch)](batch)
            kv.pump()
    finally:
        kv.close()
