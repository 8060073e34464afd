"""SGLang's `POST /v1/rerank`: a cross-encoder scores each (query, document) pair.

    {"query": str, "documents": [str], "top_n": int, "return_documents": bool, "model": str}
    -> [{"score": float, "document": str | null, "index": i, "meta_info": {...}}, ...]

Each pair is tokenized as the model's tokenizer encodes a text pair (BERT: [CLS] q [SEP] d [SEP];
XLM-RoBERTa: <s> q </s></s> d </s>) and scored as one prompt; a single-label cross-encoder's score
is a sigmoid (shared/models/sequence_classification.py). The answer is sorted by score, highest
first, cut to `top_n` when given; `document` is null with `return_documents: false`. A model that
is not a cross-encoder answers 400 naming what it is.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import check_batch_size, http_error, read_json_object
from pdserve.router.openai.common import router_state
from pdserve.router.openai.embedding_inputs import CROSS_ENCODER, embed, require_model
from pdserve.router.state import RouterState


def _nonempty_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def parse_rerank(body: dict[str, Any], max_batch_size: int) -> tuple[str, list[str], int | None, bool]:
    """(query, documents, top_n, return_documents); http_error 400 naming the first bad field."""
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str) or not query.strip():
        raise http_error(400, "query must be a non-empty string.")
    if not isinstance(documents, list) or not documents:
        raise http_error(400, "documents must be a non-empty list of strings.")
    for i, doc in enumerate(documents):
        if not _nonempty_text(doc):
            raise http_error(400, f"documents[{i}] must be a non-empty string.")
    check_batch_size(len(documents), max_batch_size)
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise http_error(400, "top_n must be a positive integer.")
    return_documents = body.get("return_documents", True)
    if not isinstance(return_documents, bool):
        raise http_error(400, "return_documents must be a boolean.")
    return query, documents, top_n, return_documents


def pair_ids(state: RouterState, query: str, documents: list[str]) -> list[list[int]]:
    tokenizer = state.require_tokenizer()
    return [list(tokenizer(query, doc, add_special_tokens=True)["input_ids"]) for doc in documents]


async def handle_rerank(request: web.Request) -> web.Response:
    state = router_state(request)
    body = await read_json_object(request)
    require_model(state, "/v1/rerank", lambda facts: facts.cross_encoder, CROSS_ENCODER)
    query, documents, top_n, return_documents = parse_rerank(body, state.args.max_batch_size)
    started = time.monotonic()
    outs = await embed(state, pair_ids(state, query, documents))
    latency = time.monotonic() - started
    order = sorted(range(len(outs)), key=lambda i: outs[i].embedding[0], reverse=True)
    ranked = [
        {
            "score": outs[i].embedding[0],
            "document": documents[i] if return_documents else None,
            "index": i,
            "meta_info": {
                "id": outs[i].rid,
                "prompt_tokens": outs[i].prompt_tokens,
                "cached_tokens": outs[i].cached_tokens,
                "e2e_latency": latency,
            },
        }
        for i in order
    ]
    return web.json_response(ranked[:top_n] if top_n is not None else ranked)
