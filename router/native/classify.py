"""SGLang's `/classify` (POST and PUT): a reward or classification model's scores of text or token ids.

    POST /classify {"text": str | [str]}  or  {"input_ids": [int] | [[int]]}
      -> {"embedding": [score per label], "meta_info": {...}}      (a list of those for a batch)

The shape is /encode's, as SGLang answers it (its reward models run as embedding models): the
`embedding` holds the model's scores, one per label (`id2label` order). A model without a
classification head answers 400 naming what it is.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.native.encode import pooled_items
from pdserve.router.openai.embedding_inputs import CLASSIFIER, require_model
from pdserve.router.state import STATE_KEY


async def handle_classify(request: web.Request) -> web.Response:
    require_model(request.app[STATE_KEY], "/classify", lambda facts: bool(facts.labels), CLASSIFIER)
    items, batched = await pooled_items(request, "/classify")
    return web.json_response(items if batched else items[0])
