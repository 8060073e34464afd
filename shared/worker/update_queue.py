"""The worker loop's side of `/update_weights_from_disk` and `/update_weights_from_tensor`: check,
drain, swap, release.

One update at a time, in arrival order; each goes through three phases:

  checking  the checkpoint is resolved and checked against the live model (or the tensors are
            opened, shared/engine/tensor_payload.py, and checked, tensor_weights.py; under
            tensor parallelism rank 0's entry, tp_tensor_updates.py) in a helper
            thread (resolving a hub id can take long) while the loop keeps serving as usual;
            an update that does not fit is answered with the failure at once, nothing paused.
  draining  new requests are held in arrival order (not refused, not admitted); requests
            already in the engine (running or queued) finish with the old weights. Past
            `drain_timeout_s` the stragglers are aborted with DRAIN_TIMEOUT_MESSAGE. While
            generation is paused (`is_paused`) requests in the engine cannot finish: the update
            fails at once instead, saying so (PAUSED_IN_PLACE_MESSAGE).
  swapping  the idle engine copies the weights in, flushes its radix cache (a tensor update may
            ask to keep it) and sets the new weight_version; the requester gets
            UpdateWeightsResult; held requests are handed back to the loop (`admit`).

Rules: only the loop thread calls this class (`advance()` once per turn); the helper thread only
opens tensors and reads parameter shapes, never parameter values. The held queue also keeps the
requests that arrive while generation is paused (`hold`, `release_held`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.shared.engine.tensor_payload import TensorPayloadError
from pdserve.shared.engine.tensor_weights import TENSOR_UPDATE_OK, CheckedTensors
from pdserve.shared.engine.tp_tensor_updates import check_rank_tensors, rank_entries, swap_rank_tensors
from pdserve.shared.engine.weight_swap import CheckedWeights, WeightsUpdateError
from pdserve.shared.protocol import (
    GenerateRequest,
    Message,
    RequestMessage,
    RequestOutput,
    UpdateWeightsFromTensor,
    UpdateWeightsRequest,
    UpdateWeightsResult,
)

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 120.0


def num_samples(msg: GenerateRequest) -> int:
    """n of a request that has not been validated yet (a bad n counts as 1; the engine refuses it later)."""
    n = msg.sampling_params.get("n", 1)
    return n if isinstance(n, int) and n >= 1 else 1


PAUSED_IN_PLACE_MESSAGE = (
    "Failed to update weights: generation is paused with requests held in place, which cannot "
    'finish before the swap; call /continue_generation first, or pause with mode "abort".'
)


def drain_timeout_message(timeout_s: float) -> str:
    return (
        "Aborted: the worker is updating its model weights and this request did not finish "
        f"within the {timeout_s:g} s drain timeout."
    )


AnyUpdate = UpdateWeightsRequest | UpdateWeightsFromTensor


@dataclass
class _Update:
    identity: bytes
    request: AnyUpdate
    check: Future[CheckedWeights | CheckedTensors]
    checked: CheckedWeights | CheckedTensors | None = None
    drain_deadline: float = 0.0


class WeightUpdates:
    def __init__(
        self,
        engine,
        send: Callable[[bytes, Message], None],
        deliver: Callable[[list[RequestOutput]], None],
        admit: Callable[[bytes, RequestMessage], None],
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        is_paused: Callable[[], bool] = lambda: False,
    ):
        self.engine = engine
        self._send = send  # a reply to one client
        self._deliver = deliver  # engine outputs to their owners
        self._admit = admit  # a held request, handled as if it arrived now
        self._is_paused = is_paused
        self.drain_timeout_s = drain_timeout_s
        self._queue: deque[tuple[bytes, AnyUpdate]] = deque()
        self._current: _Update | None = None
        self.held: deque[tuple[bytes, RequestMessage]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-check")

    @property
    def holding(self) -> bool:
        """True while new requests must wait (draining or swapping)."""
        return self._current is not None and self._current.checked is not None

    @property
    def num_held(self) -> int:
        return sum(num_samples(msg.request) for _, msg in self.held)

    def submit(self, identity: bytes, request: AnyUpdate) -> None:
        self._queue.append((identity, request))
        self.advance()

    def hold(self, identity: bytes, request: RequestMessage) -> None:
        self.held.append((identity, request))

    def release_held(self) -> None:
        """Hands the held requests back to the loop (generation continues), unless an update
        still holds them; it hands them back itself when it is done."""
        if self.holding:
            return
        held, self.held = self.held, deque()
        for identity, request in held:
            self._admit(identity, request)

    def take_held(self, rid: str) -> RequestMessage | None:
        """Removes and returns the held request `rid` (a client aborted it), or None."""
        for i, (_, msg) in enumerate(self.held):
            if msg.request.rid == rid:
                del self.held[i]
                return msg
        return None

    # ------------------------------------------------------------------ the phases

    def advance(self) -> None:
        """Moves the current update on as far as it can go now; never blocks on the check."""
        if self._current is None:
            if not self._queue:
                return
            identity, request = self._queue.popleft()
            check = self._executor.submit(_CHECKS[type(request)], self.engine, request)
            self._current = _Update(identity, request, check)
        update = self._current
        if update.checked is None:
            if not update.check.done():
                return
            try:
                update.checked = update.check.result()
            except WeightsUpdateError as exc:
                self._finish(False, str(exc))
                return
            except TensorPayloadError as exc:
                self._finish(False, f"Failed to update weights: {exc}.")
                return
            except Exception as exc:  # any failure of the check is the client's answer
                logger.exception("checking the weights of %s failed", _source(update.request))
                self._finish(False, f"Failed to update weights: {type(exc).__name__}: {exc}.")
                return
            update.drain_deadline = time.monotonic() + self.drain_timeout_s
            logger.info("weights from %s fit: draining before the swap", _source(update.request))
        if self.engine.has_work():
            if self._is_paused():
                self._finish(False, PAUSED_IN_PLACE_MESSAGE)
                return
            if time.monotonic() < update.drain_deadline:
                return
            aborted = self.engine.abort_all(drain_timeout_message(self.drain_timeout_s))
            logger.warning("weights update: aborted %d request(s) after the drain timeout", len(aborted))
            self._deliver(aborted)
        ok, message = _SWAPS[type(update.request)](self.engine, update.request, update.checked)
        self._finish(ok, message)

    def _finish(self, success: bool, message: str) -> None:
        update, self._current = self._current, None
        assert update is not None
        if not success:
            logger.warning("weights update from %s failed: %s", _source(update.request), message)
        self._send(
            update.identity,
            UpdateWeightsResult(
                query_id=update.request.query_id,
                success=success,
                message=message,
                weight_version=self.engine.weight_version,
            ),
        )
        held, self.held = self.held, deque()
        for identity, request in held:
            self._admit(identity, request)
        self.advance()  # the next queued update starts checking at once

    def close(self, message: str) -> list[tuple[bytes, RequestMessage]]:
        """Shutdown: fails the current and queued updates; returns the held requests to refuse."""
        pending = ([(self._current.identity, self._current.request)] if self._current else []) + list(
            self._queue
        )
        self._current, self._queue = None, deque()
        for identity, request in pending:
            self._send(
                identity,
                UpdateWeightsResult(
                    query_id=request.query_id,
                    success=False,
                    message=f"Failed to update weights: {message}.",
                    weight_version=self.engine.weight_version,
                ),
            )
        self._executor.shutdown(wait=False, cancel_futures=True)
        held, self.held = list(self.held), deque()
        return held


# ---------------------------------------------------------------- per kind of update


def _source(request: AnyUpdate) -> str:
    return request.model_path if isinstance(request, UpdateWeightsRequest) else "tensors"


def _check_disk(engine, request: UpdateWeightsRequest) -> CheckedWeights:
    return engine.check_weights(request.model_path, request.load_format)


def _check_tensors(engine, request: UpdateWeightsFromTensor) -> CheckedTensors:
    tp = engine.runner.tp
    entries = rank_entries(request.serialized_named_tensors, 1 if tp is None else tp.size)
    return check_rank_tensors(engine.runner, entries[0], request.load_format)  # rank 0's entry


def _swap_disk(engine, request: UpdateWeightsRequest, checked: CheckedWeights) -> tuple[bool, str]:
    return engine.update_weights_from_disk(
        request.model_path, request.load_format, request.weight_version, checked=checked
    )


def _swap_tensors(engine, request: UpdateWeightsFromTensor, checked: CheckedTensors) -> tuple[bool, str]:
    if engine.has_work():
        return False, "Failed to update weights: requests are still running."
    tp = engine.runner.tp
    entries = rank_entries(request.serialized_named_tensors, 1 if tp is None else tp.size)
    try:  # checked: every tensor fits, so a copy cannot fail half-way; followers check theirs first
        swap_rank_tensors(engine.runner, checked, entries, request.load_format)
    except WeightsUpdateError as exc:
        return False, str(exc)
    engine.note_new_weights(request.weight_version, request.flush_cache)
    return True, TENSOR_UPDATE_OK


_CHECKS = {UpdateWeightsRequest: _check_disk, UpdateWeightsFromTensor: _check_tensors}
_SWAPS = {UpdateWeightsRequest: _swap_disk, UpdateWeightsFromTensor: _swap_tensors}
