"""SGLang's OpenAI-style `POST /v1/classify`, on a reward or classification model.

    {"input": str | [str] | [int] | [[int]], "model": str}
    -> {"id": "classify-...", "object": "list", "created": t, "model": ...,
        "data": [{"index": i, "label": str, "probs": [float], "num_classes": n}],
        "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                  "prompt_tokens_details": null}}

`probs` is the softmax of the model's scores and `label` the `id2label` name of the largest, as
SGLang answers. A model without a classification head answers 400 naming what it is.
"""

from __future__ import annotations

import math
import time
import uuid

from aiohttp import web

from pdserve.router.http.limits import http_error, read_json_object
from pdserve.router.openai.common import router_state
from pdserve.router.openai.embedding_inputs import CLASSIFIER, embed, input_token_lists, require_model


def softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


async def handle_classify_v1(request: web.Request) -> web.Response:
    state = router_state(request)
    body = await read_json_object(request)
    require_model(state, "/v1/classify", lambda facts: bool(facts.labels), CLASSIFIER)
    facts = state.require_ready()
    if "input" not in body:
        raise http_error(400, "input is required.")
    ids, _ = input_token_lists(state, body["input"], "input")
    outs = await embed(state, ids)
    data = []
    for i, out in enumerate(outs):
        probs = softmax(out.embedding)
        best = max(range(len(probs)), key=probs.__getitem__)
        label = facts.labels[best] if best < len(facts.labels) else f"LABEL_{best}"
        data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
    tokens = sum(o.prompt_tokens for o in outs)
    model = body.get("model")
    return web.json_response(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model if isinstance(model, str) and model else state.model_name,
            "data": data,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    )
