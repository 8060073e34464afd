"""SGLang's `POST /v1/score`: how likely each label token is right after query + item, on a
generation model.

    {"query": str | [int], "items": str | [str] | [[int]], "label_token_ids": [int],
     "apply_softmax": bool, "item_first": bool, "model": str}
    -> {"scores": [[score per label] per item], "model": ..., "object": "scoring",
        "usage": {"prompt_tokens", "completion_tokens": 0, "total_tokens"}}

Each item is one prompt: the query then the item (the item first with `item_first`), texts joined
as text and tokenized as /generate tokenizes text, token ids joined as lists. A score is the
probability of the label token as the next token over the whole vocabulary, or with
`apply_softmax` the softmax over the label tokens alone. The workers compute it as the logprobs of
those ids (`token_ids_logprob`) at the one greedy token generated after the prompt.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import check_batch_size, http_error, read_json_object
from pdserve.router.openai.classify import softmax
from pdserve.router.openai.common import router_state
from pdserve.router.openai.embedding_inputs import is_token_ids
from pdserve.router.serving.generator_api import GenerateInput, GenerationError
from pdserve.router.state import RouterState


def score_prompts(state: RouterState, body: dict[str, Any]) -> list[list[int]]:
    """One token-id prompt per item; http_error 400 naming the first bad field."""
    query, items = body.get("query"), body.get("items")
    item_first = body.get("item_first", False)
    if not isinstance(item_first, bool):
        raise http_error(400, "item_first must be a boolean.")
    if isinstance(items, str) or (
        isinstance(items, list) and items and all(isinstance(i, str) for i in items)
    ):
        if not isinstance(query, str) or not query:
            raise http_error(400, "query must be a non-empty string when items are text.")
        texts = [items] if isinstance(items, str) else items
        check_batch_size(len(texts), state.args.max_batch_size)
        encode = state.encoder(add_special_tokens=True)
        return [encode(item + query if item_first else query + item) for item in texts]
    if isinstance(items, list) and items and all(is_token_ids(i) for i in items):
        if not is_token_ids(query):
            raise http_error(400, "query must be a non-empty list of token ids when items are token ids.")
        check_batch_size(len(items), state.args.max_batch_size)
        return [item + query if item_first else query + item for item in items]
    raise http_error(
        400, "items must be a string, a non-empty list of strings or a non-empty list of token-id lists."
    )


def label_ids(state: RouterState, value: Any) -> list[int]:
    vocab = state.require_generation().vocab_size
    if not is_token_ids(value) or any(not 0 <= t < vocab for t in value):
        raise http_error(400, f"label_token_ids must be a non-empty list of token ids in [0, {vocab}).")
    return list(value)


async def _label_logprobs(state: RouterState, prompt: list[int], labels: list[int]) -> list[float]:
    inp = GenerateInput(
        rid=f"score-{uuid.uuid4().hex}",
        input_ids=prompt,
        sampling_params={"max_new_tokens": 1, "temperature": 0.0},
        return_logprob=True,
        token_ids_logprob=labels,
    )
    rows: list[Any] = []
    async for event in state.generator.stream(inp):
        rows.extend(event.output_token_ids_logprobs or [])
    by_id = {int(entry[1]): float(entry[0]) for entry in (rows[0] or [])} if rows else {}
    if any(t not in by_id for t in labels):
        raise GenerationError(500, "the worker returned no logprobs for the label tokens")
    return [by_id[t] for t in labels]


def scores_of(logprobs: list[float], apply_softmax: bool) -> list[float]:
    # the softmax of the labels' logprobs is that of their logits: the normalizer cancels
    return softmax(logprobs) if apply_softmax else [math.exp(lp) for lp in logprobs]


async def handle_score(request: web.Request) -> web.Response:
    state = router_state(request)
    body = await read_json_object(request)
    labels = label_ids(state, body.get("label_token_ids"))
    apply_softmax = body.get("apply_softmax", False)
    if not isinstance(apply_softmax, bool):
        raise http_error(400, "apply_softmax must be a boolean.")
    prompts = score_prompts(state, body)
    logprobs = await asyncio.gather(*(_label_logprobs(state, p, labels) for p in prompts))
    tokens = sum(len(p) for p in prompts)
    model = body.get("model")
    return web.json_response(
        {
            "scores": [scores_of(lps, apply_softmax) for lps in logprobs],
            "model": model if isinstance(model, str) and model else state.model_name,
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
            "object": "scoring",
        }
    )
