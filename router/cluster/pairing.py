"""Where one attempt of a request goes: a mixed worker, a decode worker alone, or a prefill/decode pair.

    pairing = Pairing(pool, make_policy("cache_aware"), make_decode_policy("least_load"), 64)
    route = pairing.route(req.input_ids, num_samples, tried)    # NoWorkerAvailable when none can
    route.messages(req, wire_rid)                                # (to route.worker, to route.prefill)

Rules:
- while the pool has a live decode worker not yet tried, the request streams from a decode
  worker chosen by the decode policy; otherwise from a mixed worker chosen by the pool's policy (a
  pool of only mixed workers behaves exactly as before pairing existed);
- a decode worker gets a prefill partner (chosen by the prefill policy among live prefill workers
  not yet tried for this request) unless the request has n > 1, its prompt is shorter than
  `local_prefill_threshold` tokens (it rides in one decode step; bench/RESULTS.md has why 64), or no prefill worker is
  left: then it prefills locally (a plain GenerateRequest);
- a pair gets `DecodeRequest(prefill_kv_endpoint=P.kv_addr)` and `PrefillRequest(decode_kv_endpoint=
  D.kv_addr)` with the same rid; a worker that has not told its KV endpoint yet is no partner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.router.cluster.policies import Policy
from pdserve.router.cluster.worker_pool import NoWorkerAvailable, WorkerHandle, WorkerPool
from pdserve.shared.protocol import DecodeRequest, GenerateRequest, PrefillRequest

DEFAULT_LOCAL_PREFILL_THRESHOLD = 64  # tokens; shorter prompts prefill at the decode worker


@dataclass
class Tried:
    """Workers already tried for one request: those that streamed (or failed to), and prefill partners."""

    workers: set[str] = field(default_factory=set)
    prefill: set[str] = field(default_factory=set)
    attempts: int = 0


@dataclass(frozen=True)
class Route:
    worker: WorkerHandle  # streams the tokens: a mixed worker, or a decode worker
    prefill: WorkerHandle | None = None  # the pair's prefill worker; None: the worker prefills itself

    def messages(
        self, req: GenerateRequest, wire_rid: str
    ) -> tuple[GenerateRequest | DecodeRequest, PrefillRequest | None]:
        """The message for `worker` and, for a pair, the one for `prefill`; both with rid `wire_rid`
        (the request itself on a first attempt: no copy)."""
        attempt = req if wire_rid == req.rid else dataclasses.replace(req, rid=wire_rid)
        if self.prefill is None:
            return attempt, None
        return (
            DecodeRequest(attempt, self.prefill.kv_addr, self.prefill.worker_id),
            PrefillRequest(attempt, self.worker.kv_addr, self.worker.worker_id),
        )


class Pairing:
    def __init__(
        self,
        pool: WorkerPool,
        prefill_policy: Policy,
        decode_policy: Policy,
        local_prefill_threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD,
    ):
        self.pool = pool
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.local_prefill_threshold = local_prefill_threshold
        pool.role_policies += [prefill_policy, decode_policy]

    def route(self, input_ids: Sequence[int], num_samples: int, tried: Tried, local: bool = False) -> Route:
        """The next attempt's route (breakers have let its workers through); NoWorkerAvailable if none.
        `local`: no prefill partner (a moved request prefills where it streams from)."""
        decoders = [h for h in self.pool.candidates(tried.workers, "decode") if h.kv_addr]
        if not decoders:
            return Route(self.pool.pick(input_ids, tried.workers | self._decode_ids()))
        worker = self.pool.pick(
            input_ids, tried.workers | self._ids_not_in(decoders), "decode", self.decode_policy
        )
        if local or num_samples > 1 or len(input_ids) < self.local_prefill_threshold:
            return Route(worker)
        # a prefill partner stores KV as the decode worker does (the transfer refuses a mismatch)
        prefillers = [
            h
            for h in self.pool.candidates(tried.prefill, "prefill")
            if h.kv_addr and h.kv_cache_dtype == worker.kv_cache_dtype
        ]
        if not prefillers:
            return Route(worker)
        try:
            prefill = self.pool.pick(
                input_ids, tried.prefill | self._ids_not_in(prefillers), "prefill", self.prefill_policy
            )
        except NoWorkerAvailable:  # the last one's half-open probe slot was just taken
            return Route(worker)
        return Route(worker, prefill)

    def _decode_ids(self) -> set[str]:
        return {h.worker_id for h in self.pool.workers.values() if h.role == "decode"}

    def _ids_not_in(self, handles: list[WorkerHandle]) -> set[str]:
        keep = {h.worker_id for h in handles}
        return {w for w in self.pool.workers if w not in keep}
