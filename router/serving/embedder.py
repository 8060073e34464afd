"""Embeddings through the cluster: one EmbedRequest per input, each answered by one EmbeddingOutput.

    outs = await RouterEmbedder(pool, max_attempts=3, timeout_s=None).embed([[101, 2023, 102], ...])

Rules:
- each input goes to a prefill or mixed worker (router/cluster/embedding_route.py) as its own
  request, all at once: the worker's scheduler batches those that arrive together into one forward;
- a worker lost before it answered, or one shutting down, is a retry on another worker (up to
  `max_attempts` workers); a worker's refusal of the input itself is a 400 with its message;
- no worker at all is a 503; past `timeout_s` the worker gets an AbortRequest and the caller a 504.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

from pdserve.router.cluster.embedding_route import pick_embedding_worker
from pdserve.router.cluster.worker_conn import WorkerUnavailable
from pdserve.router.cluster.worker_pool import NoWorkerAvailable, WorkerPool
from pdserve.router.serving.generator_api import GenerationError
from pdserve.shared.protocol import EmbeddingOutput, EmbedRequest

SHUTTING_DOWN = "worker is shutting down"  # a worker's refusal that another worker may not give
NO_TIMEOUT_S = 3600.0  # a query needs some bound; without --request-timeout an hour stands for none


class RouterEmbedder:
    def __init__(self, pool: WorkerPool, max_attempts: int, timeout_s: float | None):
        self.pool = pool
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s

    async def embed(self, inputs: Sequence[list[int]]) -> list[EmbeddingOutput]:
        """The answers in input order; GenerationError (400, 503, 504) when any input fails."""
        return list(await asyncio.gather(*(self.embed_one(ids) for ids in inputs)))

    async def embed_one(self, input_ids: list[int]) -> EmbeddingOutput:
        rid = f"embed-{uuid.uuid4().hex}"
        deadline = time.monotonic() + (self.timeout_s or NO_TIMEOUT_S)
        tried: set[str] = set()
        why = ""
        while len(tried) < self.max_attempts:
            try:
                handle = pick_embedding_worker(self.pool, input_ids, tried)
            except NoWorkerAvailable as exc:
                raise GenerationError(503, str(exc)) from None
            tried.add(handle.worker_id)
            handle.inflight += 1
            try:
                out = await handle.conn.query(
                    EmbedRequest(rid=rid, input_ids=input_ids), EmbeddingOutput, deadline - time.monotonic()
                )
            except WorkerUnavailable as exc:
                handle.breaker.record_failure()
                why = str(exc)
                continue
            except (TimeoutError, asyncio.TimeoutError):
                handle.conn.send_abort(rid, "The request timed out at the router.")
                raise GenerationError(504, f"The embedding took longer than {self.timeout_s:g} s.") from None
            finally:
                handle.inflight -= 1
            handle.breaker.record_success()
            if out.error is None:
                return out
            if out.error == SHUTTING_DOWN:
                why = f"worker {handle.worker_id} is shutting down"
                continue
            raise GenerationError(400, out.error)
        raise GenerationError(503, f"The embedding failed on {len(tried)} worker(s): {why}")
