"""A weight update on every rank of a tensor-parallel worker, all or nothing.

Rank 0 (its engine idle, the checkpoint checked against its slice: every rank's slices have the
same shapes) sends `ReloadWeights` on the step channel (tp_steps.py); each follower acts on it
between passes. Then every rank, rank 0 included, loads its slice of the new checkpoint (cut as
at load, weight_swap.py) and the ranks exchange their errors (a collective). If any rank failed,
every rank restores the weights it served before, and rank 0 raises the first failure's message.
Without tensor parallelism this is the single-process copy with its restore.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.tp_steps import ReloadWeights
from pdserve.shared.engine.weight_swap import (
    CheckedWeights,
    WeightsUpdateError,
    apply_weights,
    restore_weights,
)
from pdserve.shared.models.tensor_parallel_layers import TPRank

logger = logging.getLogger(__name__)


def swap_weights(runner: ModelRunner, checked: CheckedWeights, previous_dir: Path) -> None:
    """Rank 0 (or the only rank): the checked checkpoint into every rank's model; raises
    WeightsUpdateError with every rank back on the weights of `previous_dir`."""
    if runner.step_sender is not None:
        runner.step_sender.send_control(ReloadWeights(str(checked.local_dir), checked.load_format))
    error = _reload_everywhere(runner, checked, previous_dir)
    if error is not None:
        raise WeightsUpdateError(error)


def follow_reload(runner: ModelRunner, message: ReloadWeights) -> None:
    """A follower's part of rank 0's `swap_weights`; on success its slices come from there on."""
    checked = CheckedWeights(message.local_dir, Path(message.local_dir), message.load_format)
    if _reload_everywhere(runner, checked, Path(runner.local_dir)) is None:
        runner.local_dir = checked.local_dir
        runner.args.load_format = checked.load_format


def ranks_verdict(tp: TPRank | None, error: str | None) -> str | None:
    """The ranks exchange their errors (a collective): None when every rank succeeded, else the
    first failure's message naming its rank. Without tensor parallelism: `error` itself."""
    if tp is None:
        return error
    errors: list[str | None] = [None] * tp.size
    dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    return f"{failed[0][1]} (tensor-parallel rank {failed[0][0]})" if failed else None


def _reload_everywhere(runner: ModelRunner, checked: CheckedWeights, previous_dir: Path) -> str | None:
    """This rank's copy, then the ranks' verdict: None when every rank succeeded, else the first
    failure's message (every rank restored)."""
    error: str | None = None
    try:
        apply_weights(runner.model, checked, runner.shard_rules, runner.config.dtype)
    except WeightsUpdateError as exc:
        error = str(exc)
    error = ranks_verdict(runner.tp, error)
    if error is not None:
        logger.warning("weight update failed, restoring the previous weights: %s", error)
        restore_weights(runner.model, runner.args, previous_dir, runner.shard_rules, runner.config.dtype)
    return error
