"""Which worker computes an embedding: a prefill or a mixed worker, never a decode worker.

    handle = pick_embedding_worker(pool, input_ids, exclude)   # NoWorkerAvailable when none can

An embedding is prefill-only work: in a P/D cluster it goes to a prefill worker (mixed workers
too, where there are any), chosen among them by the pool's policy; a pool of only mixed workers
sends it to them. Decode workers refuse embeddings (shared/worker/embedding_intake.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.router.cluster.worker_pool import NoWorkerAvailable, WorkerHandle, WorkerPool

EMBEDDING_ROLES = ("prefill", "mixed")


def pick_embedding_worker(
    pool: WorkerPool, input_ids: Sequence[int], exclude: set[str] | frozenset[str] = frozenset()
) -> WorkerHandle:
    """A live prefill or mixed worker its breaker lets through; NoWorkerAvailable if none."""
    while True:
        candidates = [h for role in EMBEDDING_ROLES for h in pool.candidates(exclude, role)]
        if not candidates:
            raise NoWorkerAvailable(
                "No prefill or mixed worker can compute embeddings: "
                + pool.why_none(exclude, EMBEDDING_ROLES, "compute embeddings")
            )
        handle = pool.policy.choose(candidates, input_ids)
        if handle.breaker.allow():
            return handle
        exclude = {*exclude, handle.worker_id}  # a half-open probe slot was just taken
