"""The decode role's engine: the shared Engine with pre-allocation and a KV receiver per remote request.

Life of a DecodeRequest, queues in order (a grammar that is not cached compiles first, the
request waiting in the scheduler's `compiling` queue: shared/engine/grammar_compiles.py):

    add_remote ──▶ prealloc ──▶ waiting_for_kv ──▶ running ──▶ finished
                    (receiver    (pages allocated,  (first token reported at once, with the
                     made)        receiver.init;     prefill side's logprobs; then one token per
                                  polled each step)  step, as any request of a continuous batch)

Each `step()` first advances the transfers, never blocking: receivers that reached a final state
are settled (Success: the first token and logprobs from `first_output` go into the request, which
joins the running batch and is reported; Failed: its pages are freed, uncached, and it finishes
with finish_reason abort and "KV transfer failed: <why>"); then queued remote requests get pages
while the pool allows (decode/decode_role.py) and their receivers learn where the KV goes. Then one
batch runs, as in the mixed engine.

A plain GenerateRequest is prefilled locally (the router does that for short prompts, n > 1, or
when no prefill worker is alive). Abort at any stage aborts the receiver before the pages are
freed. Outputs are RequestOutputs, exactly as a mixed engine's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pdserve.decode.decode_role import DEFAULT_NUM_RESERVED_DECODE_TOKENS, DecodeRole
from pdserve.decode.receiving import Arrival, KVReceiveQueue
from pdserve.kvtransfer.base import KVManager, KVTransferError
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.handoff import HandoffError, apply_first_output
from pdserve.shared.engine.kv_pool import PagedKVPool
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import DecodeRequest, RequestOutput

logger = logging.getLogger(__name__)


class DecodeEngine(Engine):
    """`make_kv_manager(pool)` builds this worker's KVManager over the engine's KV pool;
    `overlap_schedule` as in Engine."""

    def __init__(
        self,
        args: EngineArgs,
        make_kv_manager: Callable[[PagedKVPool], KVManager],
        num_reserved_decode_tokens: int = DEFAULT_NUM_RESERVED_DECODE_TOKENS,
        overlap_schedule: bool | None = None,
    ):
        role = DecodeRole(num_reserved_decode_tokens)
        super().__init__(args, overlap_schedule=overlap_schedule, scheduler_role=role)
        self.role = role
        self.kv_manager = make_kv_manager(self.runner.pool)
        self.receives = KVReceiveQueue()
        self.batch_log.role_fields = self._batch_log_fields

    def _batch_log_fields(self, kind: str) -> str:
        """SGLang's decode-role fields of its decode line (shared/engine/batch_log.py)."""
        if kind != "decode":
            return ""
        role = self.role
        total = self.kv.num_total_pages
        held = sum(len(r.pages) for r in role.waiting_for_kv)
        retracted = sum(1 for r in self.scheduler.waiting if r.num_retractions)
        return (
            f"pre-allocated usage: {held / total if total else 0.0:.2f}, #prealloc-req: {len(role.prealloc)}, "
            f"#transfer-req: {len(role.waiting_for_kv)}, #retracted-req: {retracted}, "
        )

    # ------------------------------------------------------------------ requests

    def add_remote(self, msg: DecodeRequest) -> None:
        """Queues a request whose KV comes from a prefill worker (a GenerateRequest, through
        add_request, is prefilled here); raises RequestError when it is refused."""
        gen = msg.request
        req = self._remote_sample(gen, msg.prefill_kv_endpoint, "prefill")
        try:
            receiver = self.kv_manager.make_receiver(gen.rid, msg.prefill_kv_endpoint)
        except KVTransferError as exc:
            raise RequestError(f"KV transfer from {msg.prefill_kv_endpoint} cannot start: {exc}") from exc
        # pre-allocated once its grammar is compiled: the matcher must take the prefill side's token
        self.grammars.attach([req], self.role.add_remote)
        self.receives.add(req, receiver)
        self._track(gen.rid, [req])

    def step(self) -> list[RequestOutput]:
        """Transfers first (arrivals are reported with their first token), then one batch."""
        outputs = self._advance_transfers()
        return outputs + super().step()

    def _advance_transfers(self) -> list[RequestOutput]:
        outputs = [self._settle(a) for a in self.receives.poll()]
        for req in self.role.preallocate():
            refused = self.receives.init(req)
            if refused is not None:
                outputs.append(self._settle(refused))
        return outputs

    def _settle(self, arrival: Arrival) -> RequestOutput:
        req, reason = arrival.req, arrival.reason
        if arrival.ok:
            try:
                apply_first_output(req, arrival.first_output, self.model_config.vocab_size)
            except HandoffError as exc:
                reason = f"KV transfer failed: the prefill worker's first output is unusable: {exc}"
            else:
                self.role.kv_received(req)
                return self._emit(req)
        logger.info("request %s: %s", req.rid, reason)
        self.role.kv_failed(req, reason)
        self.stats.num_aborted += 1
        return self._emit(req)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> list[RequestOutput]:
        self.receives.drop(rid, message)  # before the pages are freed
        return super().abort(rid, message)

    def abort_all(self, message: str) -> list[RequestOutput]:
        for req in self.scheduler.all_requests():
            self.receives.drop(req.rid, message)
        return super().abort_all(message)
