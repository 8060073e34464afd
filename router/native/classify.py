"""SGLang's `/classify` (POST and PUT): a reward or classification model's scores of text or token ids.

    POST /classify {"text": str | [str]}  or  {"input_ids": [int] | [[int]]}
      -> {"embedding": [score per label], "meta_info": {...}}      (a list of those for a batch)

The shape is /encode's, as SGLang answers it (its reward models run as embedding models): the
`embedding` holds the model's scores, one per label (`id2label` order). A model without a
classification head answers 400 naming what it is.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.http.limits import http_error
from pdserve.router.native.encode import pooled_items
from pdserve.router.state import STATE_KEY


async def handle_classify(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    facts = state.require_ready()
    if not facts.labels:
        raise http_error(
            400,
            f"The served model {state.model_name} is {facts.kind}: /classify needs a reward or "
            "classification model (*ForSequenceClassification).",
        )
    items, batched = await pooled_items(request, "/classify")
    return web.json_response(items if batched else items[0])
