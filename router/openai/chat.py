"""`POST /v1/chat/completions`: messages -> chat template -> one prompt -> `n` assistant replies.

Streaming sends, per choice: a first chunk with `delta: {"role": "assistant", "content": ""}`, then
one chunk per event with new text (`delta: {"content": ...}`) or new logprobs, the last one carrying
`finish_reason` and `matched_stop`; then the usage chunk when asked, and `data: [DONE]`.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import read_json
from pdserve.router.openai.chat_template import render_chat
from pdserve.router.openai.common import openai_error, router_state, token_decoder
from pdserve.router.openai.logprobs import chat_logprobs_content
from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.protocol import ChatRequest, make_generate_input, parse_chat_request
from pdserve.router.openai.responses import (
    ChoiceState,
    aggregate_usage,
    chat_choice,
    chat_chunk,
    chat_response,
    new_id,
)
from pdserve.router.openai.streaming import StreamSpec, collect_choices, stream_choices
from pdserve.router.serving.admission_gate import parse_priority
from pdserve.router.serving.generator_api import GenerationError, SampleEvent
from pdserve.router.state import RouterState


def chat_prompt(state: RouterState, tokenizer: Any, req: ChatRequest) -> list[int]:
    """Token ids of the request's messages under the served chat template."""
    text = render_chat(
        tokenizer,
        req.messages,
        state.chat_template,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        template_kwargs=req.chat_template_kwargs,
    )
    return state.encoder(add_special_tokens=False)(text)  # chat_prompt_ids(tokenizer, text)


async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    state = router_state(request)
    try:
        body = await read_json(request)
        req = parse_chat_request(body)
        priority = parse_priority(body.get("priority"))  # SGLang's extra field (admission order)
        facts = state.require_generation()  # 503 until a worker and the tokenizer are known
        tokenizer = state.require_tokenizer()
        ids = chat_prompt(state, tokenizer, req)
        rid = new_id("chatcmpl")
        top = req.top_logprobs if req.logprobs else None
        inp = make_generate_input(
            req.rid or rid, ids, req.sampling, req.max_tokens, facts.context_length, top
        )
        inp.priority = priority
    except (OpenAIRequestError, GenerationError) as exc:
        return openai_error(exc)
    created, model = int(time.time()), req.model or state.model_name
    decode = token_decoder(tokenizer)
    tops_asked = req.top_logprobs > 0

    def content_logprobs(entries, tops) -> list[dict[str, Any]] | None:
        if not req.logprobs:
            return None
        return chat_logprobs_content(entries or [], tops if tops_asked else None, decode)

    if req.stream.stream:
        spec = StreamSpec(
            rid=rid,
            created=created,
            model=model,
            obj="chat.completion.chunk",
            n=req.n,
            prompt_lens=[len(ids)],
            include_usage=req.stream.include_usage,
            continuous_usage_stats=req.stream.continuous_usage_stats,
        )

        def make_chunks(_p: int, choice: ChoiceState, ev: SampleEvent) -> list[dict[str, Any]]:
            chunks = []
            if not choice.started:
                choice.started = True
                chunks.append(
                    chat_chunk(rid, created, model, choice.index, {"role": "assistant", "content": ""})
                )
            logprobs = content_logprobs(ev.output_token_logprobs, ev.output_top_logprobs)
            if ev.text_delta or logprobs or ev.finished:
                delta = {"content": ev.text_delta} if ev.text_delta else {}
                reason = choice.finish_reason if ev.finished else None
                chunks.append(chat_chunk(rid, created, model, choice.index, delta, logprobs, reason))
            return chunks

        return await stream_choices(request, state.generator, [inp], spec, make_chunks)
    try:
        choices = await collect_choices(state.generator, [inp], req.n)
    except GenerationError as exc:
        return openai_error(exc)
    body_choices = [
        chat_choice(c.index, c.text, content_logprobs(c.token_logprobs, c.top_logprobs), c.finish_reason)
        for c in choices
    ]
    usage = aggregate_usage(choices, req.n, [len(ids)])
    return web.json_response(chat_response(rid, created, model, body_choices, usage))
