"""OpenAI's `POST /v1/embeddings`, on an embedding model.

    {"input": str | [str] | [int] | [[int]], "model": str, "encoding_format": "float" | "base64",
     "dimensions": int}
    -> {"object": "list", "data": [{"object": "embedding", "embedding": [...] | "<base64>", "index": i}],
        "model": <the request's model, else the served name>,
        "usage": {"prompt_tokens": n, "total_tokens": n}}

base64 is the little-endian float32 bytes of the vector, as OpenAI's client decodes it.
`dimensions` is refused (400) unless the model was trained for cut embeddings (Matryoshka).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.openai.common import router_state
from pdserve.router.openai.embedding_inputs import (
    check_dimensions,
    cut,
    embed,
    input_token_lists,
    require_embedding_model,
)

ENCODING_FORMATS = ("float", "base64")


def _encoded(vector: list[float], encoding_format: str) -> Any:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def handle_embeddings(request: web.Request) -> web.Response:
    """Creates embeddings of the input (OpenAI's embeddings API)."""
    state = router_state(request)
    body = await read_json_object(request)
    require_embedding_model(state, "/v1/embeddings")
    if "input" not in body:
        raise http_error(400, "input is required.")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise http_error(
            400, f"encoding_format must be one of {list(ENCODING_FORMATS)}, got {encoding_format!r:.50}."
        )
    dimensions = check_dimensions(state, body.get("dimensions"))
    ids, _ = input_token_lists(state, body["input"], "input")
    outs = await embed(state, ids)
    tokens = sum(o.prompt_tokens for o in outs)
    model = body.get("model")
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "embedding": _encoded(cut(o.embedding, dimensions), encoding_format),
                    "index": i,
                }
                for i, o in enumerate(outs)
            ],
            "model": model if isinstance(model, str) and model else state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
