"""Offline use of an engine: prompts in, each run to completion in one continuous batch, results out.

results = engine.generate([[1, 2, 3]], {"max_new_tokens": 8})   # Engine.generate calls run_offline
answers = embed_offline(engine, [[101, 2023, 102]])             # an embedding model's engine
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.shared.engine.output import merge_sample_outputs
from pdserve.shared.protocol import EmbeddingOutput, EmbedRequest, GenerateRequest, RequestOutput


def run_offline(
    engine: Any,  # an Engine (engine.py imports this module)
    input_ids: list[list[int]],
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    logprob_start_len: int = -1,
    token_ids_logprob: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One dict per sample, in prompt order (n>1: the n samples of a prompt follow each other), with
    output_ids and meta_info."""
    if isinstance(sampling_params, list):
        assert len(sampling_params) == len(input_ids)
        params = sampling_params
    else:
        params = [dict(sampling_params or {})] * len(input_ids)
    base = f"offline-{time.monotonic_ns()}"
    rids = [f"{base}-{i}" for i in range(len(input_ids))]
    for rid, ids, p in zip(rids, input_ids, params):
        engine.add_request(
            GenerateRequest(
                rid=rid,
                input_ids=list(ids),
                sampling_params=p,
                return_logprob=return_logprob,
                top_logprobs_num=top_logprobs_num,
                logprob_start_len=logprob_start_len,
                token_ids_logprob=token_ids_logprob,
            )
        )
    collected: dict[tuple[str, int], list[RequestOutput]] = {}
    while engine.has_work():
        for out in engine.step():
            collected.setdefault((out.rid, out.index), []).append(out)
    results = []
    for rid, p in zip(rids, params):
        for index in range(int(p.get("n", 1))):
            results.append(merge_sample_outputs(collected.get((rid, index), [])))
    return results


def embed_offline(engine: Any, input_ids: list[list[int]]) -> list[EmbeddingOutput]:
    """Embeds the prompts (one batch where they fit); one EmbeddingOutput each, in prompt order."""
    base = f"offline-embed-{time.monotonic_ns()}"
    rids = [f"{base}-{i}" for i in range(len(input_ids))]
    for rid, ids in zip(rids, input_ids):
        engine.add_embedding(EmbedRequest(rid=rid, input_ids=list(ids)))
    answers: dict[str, EmbeddingOutput] = {}
    while engine.has_work():
        engine.step()
        answers.update((out.rid, out) for out in engine.take_embeddings())
    answers.update((out.rid, out) for out in engine.take_embeddings())
    return [answers[rid] for rid in rids]
