"""SGLang's `/encode` (POST and PUT): embeddings of text or token ids, on an embedding model.

    POST /encode {"text": str | [str]}  or  {"input_ids": [int] | [[int]]}   (optional "rid")
      -> {"embedding": [float], "meta_info": {"id", "prompt_tokens", "cached_tokens",
          "weight_version", "e2e_latency"}}          (a list of those for a batch)

A generation model answers 400 naming its kind, as SGLang does.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.openai.embedding_inputs import embed, input_token_lists, require_embedding_model
from pdserve.router.state import STATE_KEY


def _rid(rids: Any, i: int) -> str | None:
    if isinstance(rids, str):
        return rids
    if isinstance(rids, list) and i < len(rids) and isinstance(rids[i], str):
        return rids[i]
    return None


async def pooled_items(request: web.Request, path: str) -> tuple[list[dict[str, Any]], bool]:
    """SGLang's items of /encode and /classify for the request's `text` or `input_ids`, and whether
    the request was a batch; the served model must pool (an embedding model or a classifier)."""
    state = request.app[STATE_KEY]
    body = await read_json_object(request)
    require_embedding_model(state, path)
    if body.get("input_ids") is not None:
        ids, batched = input_token_lists(state, body["input_ids"], "input_ids")
    elif body.get("text") is not None:
        ids, batched = input_token_lists(state, body["text"], "text")
    else:
        raise http_error(400, "Either text or input_ids must be given.")
    started = time.monotonic()
    outs = await embed(state, ids)
    latency = time.monotonic() - started
    items = [
        {
            "embedding": out.embedding,
            "meta_info": {
                "id": _rid(body.get("rid"), i) or out.rid,
                "prompt_tokens": out.prompt_tokens,
                "cached_tokens": out.cached_tokens,
                "weight_version": state.weight_version,
                "e2e_latency": latency,
            },
        }
        for i, out in enumerate(outs)
    ]
    return items, batched


async def handle_encode(request: web.Request) -> web.Response:
    """Encodes text or token ids into embeddings (SGLang's native embedding route)."""
    items, batched = await pooled_items(request, "/encode")
    return web.json_response(items if batched else items[0])
