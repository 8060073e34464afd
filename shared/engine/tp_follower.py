"""A follower rank of a tensor-parallel worker: the model's forward passes, nothing else.

Life: build the rank's ModelRunner (its slice of the weights, its heads' KV pool, the same pages as
rank 0; the collectives of that construction meet rank 0's engine building its own), then loop:
receive a pass from rank 0 (tp_steps.py), run it (its collectives meet rank 0's), drop the
logits (rank 0 samples); a control message between passes is an admin operation every rank does
(a weight update: tp_weights.py, tp_tensor_updates.py; a weight read: tp_weight_reads.py), dispatched by its type. No scheduler, no sockets to clients, no sampling.
It returns when `keep_going()` turns false (checked whenever no pass came for `poll_s`): its
launcher asks whether rank 0 is still there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.tp_steps import ReadWeights, ReloadWeights, UpdateTensors
from pdserve.shared.engine.tp_tensor_updates import follow_tensor_update
from pdserve.shared.engine.tp_weight_reads import follow_weight_read
from pdserve.shared.engine.tp_weights import follow_reload
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch
from pdserve.shared.models.resolver import resolve_model

logger = logging.getLogger(__name__)

CONTROL_HANDLERS: dict[type, Callable[[ModelRunner, Any], None]] = {
    ReloadWeights: follow_reload,
    UpdateTensors: follow_tensor_update,  # tp_tensor_updates.py
    ReadWeights: follow_weight_read,  # tp_weight_reads.py
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
    passes = 0
    while True:
        batch = receiver.receive(runner.pool, runner.attn_backend, runner.device, poll_s)
        if batch is None:
            if not keep_going():
                logger.info("tensor-parallel follower stops after %d forward passes", passes)
                return passes
            continue
        if isinstance(batch, ForwardBatch):
            runner.forward_logits(batch)
            passes += 1
        else:
            CONTROL_HANDLERS[type(batch)](runner, batch)
