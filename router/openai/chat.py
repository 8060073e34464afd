"""`POST /v1/chat/completions`: messages -> chat template -> one prompt -> `n` assistant replies.

Streaming sends, per choice: a first chunk with `delta: {"role": "assistant", "content": ""}`, then
one chunk per event with new text (`delta: {"content": ...}`) or new logprobs, the last one carrying
`finish_reason` and `matched_stop`; then the usage chunk when asked, and `data: [DONE]`.
With tools or a reasoning parser, the text goes through router/openai/chat_output.py: deltas then
carry `reasoning_content`, `content` and `tool_calls` as they become known.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import read_json
from pdserve.router.openai.chat_output import (
    ChoiceDeltas,
    OutputPlan,
    chat_message,
    finish_with_calls,
    output_plan,
)
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
    finish_reason_name,
    new_id,
)
from pdserve.router.openai.streaming import StreamSpec, collect_choices, stream_choices
from pdserve.router.openai.tool_template import prompt_inputs
from pdserve.router.serving.admission_gate import parse_priority
from pdserve.router.serving.generator_api import GenerationError, SampleEvent
from pdserve.router.state import RouterState
from pdserve.router.text.reasoning_parser import reasoning_format
from pdserve.router.text.tool_formats import call_format


def chat_prompt(state: RouterState, tokenizer: Any, req: ChatRequest) -> list[int]:
    """Token ids of the request's messages (and tools) under the served chat template."""
    messages, tools = prompt_inputs(req.messages, req.tools, state.chat_template)
    text = render_chat(
        tokenizer,
        messages,
        state.chat_template,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        template_kwargs=req.chat_template_kwargs,
        tools=tools,
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
        plan = request_output_plan(state, req)
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

        parsers: dict[int, ChoiceDeltas] = {}

        def make_chunks(_p: int, choice: ChoiceState, ev: SampleEvent) -> list[dict[str, Any]]:
            chunks = []
            if not choice.started:
                choice.started = True
                chunks.append(
                    chat_chunk(rid, created, model, choice.index, {"role": "assistant", "content": ""})
                )
            logprobs = content_logprobs(ev.output_token_logprobs, ev.output_top_logprobs)
            delta: dict[str, Any] = {"content": ev.text_delta} if ev.text_delta else {}
            if plan.active:
                parser = parsers.setdefault(choice.index, ChoiceDeltas(plan))
                delta = parser.delta(choice.text, ev.finished)
            if delta or logprobs or ev.finished:
                reason = None
                if ev.finished:
                    called = plan.active and parsers[choice.index].tools.called
                    reason = finish_with_calls(choice.finish_reason, called)
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
    if plan.active:
        for c, body_choice in zip(choices, body_choices, strict=True):
            message = chat_message(plan, c.text)
            reason = finish_with_calls(c.finish_reason, bool(message["tool_calls"]))
            body_choice.update(message=message, finish_reason=finish_reason_name(reason))
    usage = aggregate_usage(choices, req.n, [len(ids)])
    return web.json_response(chat_response(rid, created, model, body_choices, usage))


def request_output_plan(state: RouterState, req: ChatRequest) -> OutputPlan:
    """What to parse out of this request's output (router/openai/chat_output.py)."""
    args = state.args
    reasoning = reasoning_format(args.reasoning_parser) if args.reasoning_parser else None
    tool_format = call_format(args.tool_call_parser) if args.tool_call_parser else None
    return output_plan(req, reasoning, tool_format, state.chat_template)
