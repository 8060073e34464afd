"""The prefill role's engine: the shared Engine with a prefill-only scheduler and a KV sender per request.

Life of a PrefillRequest, queues in order:

    add_prefill ──▶ waiting ──▶ prefilling ──▶ transferring ──▶ PrefillDone(ok) out of step()
                    (scheduler: admission with      (first token sampled; KVSendQueue sends the
                     prefix match, chunked prefill;  rest and first_output; waits for Success)
                     KVSendQueue sends each chunk's
                     finished pages as it completes)

Each `step()` runs one prefill batch (as the mixed engine: chunks of several requests), then
advances the transfers: pages finished by the batch go out while later chunks still compute. A
request whose sender is final (Success or Failed) gives its pages back, the prompt's whole pages
into the radix cache (`release(..., cache=True)`), and yields one PrefillDone. Abort at any stage
(queued, mid-prefill, mid-transfer) aborts the sender first, then frees, and yields PrefillDone
with ok=False. The outputs of this engine are PrefillDone messages, never tokens: the decode
worker streams the tokens.

n > 1 is refused (the router sends such requests to a decode worker's local prefill, which
serves n samples through its own cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pdserve.kvtransfer.base import KVManager, KVTransferError
from pdserve.prefill.prefill_role import PrefillRole
from pdserve.prefill.sending import KVSendQueue, TransferOutcome
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.handoff import first_output_of
from pdserve.shared.engine.kv_pool import PagedKVPool
from pdserve.shared.engine.radix_node import RadixListener
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import GenerateRequest, PrefillDone, PrefillRequest, RequestOutput

logger = logging.getLogger(__name__)

NOT_GENERATION = "A prefill engine takes PrefillRequests (add_prefill); it generates nothing itself."
STUCK_MESSAGE = (
    "The prefill worker's KV pages were all held by unfinished prefills; this request gave its pages back."
)


class PrefillEngine(Engine):
    """`make_kv_manager(pool)` builds this worker's KVManager over the engine's KV pool; `kv_listener`
    hears the prefix cache's page changes (the worker's KV event publisher, shared/cluster/kv_events.py)."""

    def __init__(
        self,
        args: EngineArgs,
        make_kv_manager: Callable[[PagedKVPool], KVManager],
        kv_listener: RadixListener | None = None,
    ):
        # the send queue is made after the scheduler: looked up when asked
        role = PrefillRole(lambda req: self.sends.pages_sent(req.rid))
        super().__init__(args, kv_listener, scheduler_role=role)
        self.role = role
        self.kv_manager = make_kv_manager(self.runner.pool)
        self.sends = KVSendQueue(self.role.pages_ready, first_output_of)
        self._done: list[PrefillDone] = []  # answers not yet taken (take_done)
        self.batch_log.role_fields = self._batch_log_fields

    def _batch_log_fields(self, kind: str) -> str:
        """SGLang's prefill-role fields of its prefill line (shared/engine/batch_log.py)."""
        if kind != "prefill":
            return ""
        return (
            f"#prealloc-req: {self.sends.num_bootstrapping()}, #inflight-req: {len(self.role.transferring)}, "
        )

    # ------------------------------------------------------------------ requests

    def add_request(self, msg: GenerateRequest) -> None:
        raise RequestError(NOT_GENERATION)

    def add_prefill(self, msg: PrefillRequest) -> None:
        """Queues a PrefillRequest and makes its sender; raises RequestError when it is refused."""
        gen = msg.request
        req = self._remote_sample(gen, msg.decode_kv_endpoint, "decode")
        try:
            sender = self.kv_manager.make_sender(gen.rid, msg.decode_kv_endpoint)
        except KVTransferError as exc:
            raise RequestError(f"KV transfer to {msg.decode_kv_endpoint} cannot start: {exc}") from exc
        self.grammars.attach([req], self.scheduler.add)  # queued once its grammar is compiled
        self.sends.add(req, sender)
        self._track(gen.rid, [req])

    def take_done(self) -> list[PrefillDone]:
        """The PrefillDone of every request that ended since the last call (one per request): a
        prefill engine answers only through these, its step() and aborts stream no output."""
        done, self._done = self._done, []
        return done

    def step(self) -> list[RequestOutput]:
        """One prefill batch (if any can run), then the transfers; the requests done are in
        take_done(). Returns no output: the first token travels to the decode worker."""
        super().step()
        self._done += [self._conclude(o) for o in self.sends.advance()]
        stuck = self.role.stuck
        if stuck is not None and not stuck.is_finished:
            logger.warning(
                "request %s: every KV page is held by unfinished prefills; it gives its pages back", stuck.rid
            )
            self.abort(stuck.rid, STUCK_MESSAGE)
        return []

    def _conclude(self, outcome: TransferOutcome) -> PrefillDone:
        req = outcome.req
        self.role.finish_transfer(req, outcome.ok, outcome.reason)
        if not outcome.ok:
            logger.info("request %s: %s", req.rid, outcome.reason)
            self.stats.num_aborted += 1
        self._retire(req)
        return _done(req, outcome.ok, outcome.reason)

    def abort(self, rid: str, message: str = "Aborted by the client.") -> list[RequestOutput]:
        """Aborts rid at whatever stage it is: the sender first (its pages are then no longer read),
        then the pages; one PrefillDone(ok=False) in take_done() if rid was live (an embedding
        request's answer goes to take_embeddings())."""
        self.sends.drop(rid, message)
        self._conclude_aborted(self.scheduler.abort(rid, message), message)
        return []

    def abort_all(self, message: str) -> list[RequestOutput]:
        for req in self.scheduler.all_requests():
            self.sends.drop(req.rid, message)
        self._conclude_aborted(self.scheduler.abort_all(message), message)
        return []

    def _conclude_aborted(self, reqs: list[Req], message: str) -> None:
        """A PrefillDone(ok=False) for each aborted prefill; an embedding request's answer (its
        error) waits in take_embeddings(), where its client looks for it."""
        self.stats.num_aborted += len(reqs)
        embeddings = [r for r in reqs if r.wants_embedding]
        self._outputs(embeddings)
        for req in reqs:
            if not req.wants_embedding:
                self._retire(req)
                self._done.append(_done(req, False, message))


def _done(req: Req, ok: bool, reason: str) -> PrefillDone:
    return PrefillDone(
        rid=req.rid, ok=ok, reason=reason, prompt_tokens=len(req.input_ids), cached_tokens=req.cached_tokens
    )
