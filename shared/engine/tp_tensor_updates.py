"""`/update_weights_from_tensor` on every rank of a tensor-parallel worker, all or nothing.

SGLang's contract: `serialized_named_tensors` holds one entry per rank, entry r read by rank r
(its scheduler indexes the list by tp_rank; one entry for several ranks is not accepted). With
checkpoint names (load_format null) each entry holds whole tensors, as SGLang's
`Engine.update_weights_from_tensor` sends them (the same tensors for every rank), and each rank
cuts its own slice as at load (ShardRules, fp8 rows quantized as fp8_checkpoint.py does). With
"direct" (the model's own parameter names) an entry holds the rank's own slices, shaped exactly
as its parameters.

    checked = check_rank_tensors(runner, entries[0], load_format)     # rank 0, helper thread
    swap_rank_tensors(runner, checked, entries, load_format)          # rank 0, engine idle
    follow_tensor_update(runner, UpdateTensors(...))                  # a follower, between passes

Rules:
- whole tensors are checked against the whole model (on the meta device) before they are cut, so
  a misshapen tensor is refused by name with the single-process message;
- nothing is copied anywhere until every rank has checked its entry: rank 0 sends each follower
  its entry (a control message on the step channel, after rank 0's own check), every rank checks,
  the ranks exchange their verdicts (tp_weights.ranks_verdict), then all copy or none does. A
  checked copy cannot fail half-way, so no rank needs a restore.
"""

from __future__ import annotations

import logging

from pdserve.shared.engine.model_runner import ModelRunner
from pdserve.shared.engine.tensor_payload import TensorPayloadError, decode_named_tensors
from pdserve.shared.engine.tensor_weights import CheckedTensors, apply_named_tensors, check_named_tensors
from pdserve.shared.engine.tp_steps import UpdateTensors
from pdserve.shared.engine.tp_weights import ranks_verdict
from pdserve.shared.engine.weight_swap import WeightsUpdateError
from pdserve.shared.models.fp8_checkpoint import fp8_checkpoint, fp8_weight_names
from pdserve.shared.models.loader import meta_model
from pdserve.shared.models.weights import checkpoint_targets

logger = logging.getLogger(__name__)

Entry = str | bytes


def rank_entries(serialized: Entry | list[Entry], num_ranks: int) -> list[Entry]:
    """The entries of a request, one per rank; WeightsUpdateError when the count is not the ranks'."""
    entries = serialized if isinstance(serialized, list) else [serialized]
    if len(entries) != num_ranks:
        raise WeightsUpdateError(
            f"Failed to update weights: serialized_named_tensors has {len(entries)} entries and the "
            f"worker runs {num_ranks} tensor-parallel rank(s): send one entry per tensor-parallel "
            "rank (entry r for rank r)."
        )
    return entries


def check_rank_tensors(runner: ModelRunner, entry: Entry, load_format: str | None) -> CheckedTensors:
    """This rank's entry opened and checked (see the module rules); raises WeightsUpdateError or
    TensorPayloadError with the message for the client."""
    named = decode_named_tensors(entry)
    dtype = runner.config.dtype
    if runner.tp is None or runner.shard_rules is None or load_format == "direct":
        return check_named_tensors(runner.model, named, load_format, dtype)
    whole = meta_model(runner.config, runner.args.quantization)
    # shapes, names and dtypes only: the meta copies read no values and quantize nothing
    check_named_tensors(whole, [(name, t.to("meta")) for name, t in named], load_format, dtype)
    fp8_weights = fp8_weight_names(checkpoint_targets(runner.model))
    sliced = list(fp8_checkpoint(named, fp8_weights, dtype, runner.shard_rules))
    return check_named_tensors(runner.model, sliced, load_format, dtype)


def swap_rank_tensors(
    runner: ModelRunner, checked: CheckedTensors, entries: list[Entry], load_format: str | None
) -> None:
    """Rank 0 (or the only rank), engine idle: every rank's tensors in, or none (WeightsUpdateError
    naming the first rank whose entry did not fit)."""
    if runner.step_sender is not None:
        runner.step_sender.send_control_each([UpdateTensors(e, load_format) for e in entries[1:]])
    error = ranks_verdict(runner.tp, None)
    if error is not None:
        raise WeightsUpdateError(error)
    apply_named_tensors(checked)


def follow_tensor_update(runner: ModelRunner, message: UpdateTensors) -> None:
    """A follower's part of `swap_rank_tensors`: check its entry, agree with the ranks, copy."""
    checked: CheckedTensors | None = None
    error: str | None = None
    try:
        checked = check_rank_tensors(runner, message.entry, message.load_format)
    except WeightsUpdateError as exc:
        error = str(exc)
    except TensorPayloadError as exc:
        error = f"Failed to update weights: {exc}."
    except Exception as exc:  # any failure is the client's answer, and the ranks must still agree
        logger.exception("checking this rank's tensors failed")
        error = f"Failed to update weights: {type(exc).__name__}: {exc}."
    if ranks_verdict(runner.tp, error) is None and checked is not None:
        apply_named_tensors(checked)
