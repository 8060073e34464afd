"""`POST /v1/completions`: prompts (text or token ids, one or a batch) -> text completions.

Choice `index` is `prompt_index * n + sample_index`, like OpenAI. With `echo` the prompt text leads
each choice's text (the first chunk of each choice when streaming), and with `logprobs` too the
prompt tokens' logprobs lead the logprob lists (the first one is None: nothing predicts it).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from pdserve.router.http.limits import check_batch_size, read_json
from pdserve.router.openai.common import openai_error, router_state, token_decoder
from pdserve.router.openai.logprobs import CompletionLogprobs, extend_completion_logprobs
from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.protocol import CompletionRequest, make_generate_input, parse_completion_request
from pdserve.router.openai.responses import (
    ChoiceState,
    aggregate_usage,
    completion_choice,
    completion_chunk,
    completion_response,
    new_id,
)
from pdserve.router.openai.streaming import StreamSpec, collect_choices, stream_choices
from pdserve.router.serving.admission_gate import parse_priority
from pdserve.router.serving.generator_api import GenerateInput, GenerationError, SampleEvent
from pdserve.router.text.tokenizer_fast import Encoder


def prompt_ids(encode: Encoder, prompt: str | list[int]) -> list[int]:
    """Token ids of one prompt; text is tokenized like the native /generate (special tokens added)."""
    return list(prompt) if isinstance(prompt, list) else encode(prompt)


def prompt_text(tokenizer: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def build_inputs(
    req: CompletionRequest, ids: list[list[int]], rid: str, context_length: int
) -> list[GenerateInput]:
    rids = req.rid or ([rid] if len(ids) == 1 else [f"{rid}-{i}" for i in range(len(ids))])
    return [
        make_generate_input(
            r, prompt, req.sampling, req.max_tokens, context_length, req.logprobs, prompt_logprobs=req.echo
        )
        for r, prompt in zip(rids, ids)
    ]


def choice_logprobs(choice: ChoiceState, echo_text: str | None, decode, with_top: bool) -> dict[str, Any]:
    """The whole choice's completions-shape logprobs (prompt tokens first when echoed)."""
    out = CompletionLogprobs(with_top=with_top)
    if echo_text is not None:
        extend_completion_logprobs(out, choice.input_token_logprobs, choice.input_top_logprobs, decode)
        out.next_offset = len(echo_text)
    extend_completion_logprobs(out, choice.token_logprobs, choice.top_logprobs, decode)
    return out.to_dict()


async def handle_completions(request: web.Request) -> web.StreamResponse:
    state = router_state(request)
    try:
        body = await read_json(request)
        req = parse_completion_request(body)
        priority = parse_priority(body.get("priority"))  # SGLang's extra field (admission order)
        check_batch_size(len(req.prompts), state.args.max_batch_size)
        facts = state.require_generation()  # 503 until a worker and the tokenizer are known
        tokenizer = state.require_tokenizer()
        encode = state.encoder()
        ids = [prompt_ids(encode, p) for p in req.prompts]
        rid = new_id("cmpl")
        inputs = build_inputs(req, ids, rid, facts.context_length)
        for inp in inputs:
            inp.priority = priority
    except (OpenAIRequestError, GenerationError) as exc:
        return openai_error(exc)
    created, model = int(time.time()), req.model or state.model_name
    echo_texts = [prompt_text(tokenizer, p) if req.echo else None for p in req.prompts]
    decode = token_decoder(tokenizer)
    with_top = bool(req.logprobs)
    if req.stream.stream:
        spec = StreamSpec(
            rid=rid,
            created=created,
            model=model,
            obj="text_completion",
            n=req.n,
            prompt_lens=[len(i) for i in ids],
            include_usage=req.stream.include_usage,
            continuous_usage_stats=req.stream.continuous_usage_stats,
        )
        offsets: dict[int, int] = {}

        def make_chunks(p: int, choice: ChoiceState, ev: SampleEvent) -> list[dict[str, Any]]:
            text, first = ev.text_delta, not choice.started
            choice.started = True
            logprobs = None
            if req.logprobs is not None:
                lp = CompletionLogprobs(with_top=with_top, next_offset=offsets.get(choice.index, 0))
                if first and echo_texts[p] is not None:
                    extend_completion_logprobs(
                        lp, ev.input_token_logprobs or [], ev.input_top_logprobs, decode
                    )
                    lp.next_offset = len(echo_texts[p])
                extend_completion_logprobs(lp, ev.output_token_logprobs or [], ev.output_top_logprobs, decode)
                offsets[choice.index] = lp.next_offset
                logprobs = lp.to_dict()
            if first and echo_texts[p] is not None:
                text = echo_texts[p] + text
            if not (text or ev.finished or (logprobs and logprobs["tokens"])):
                return []
            reason = choice.finish_reason if ev.finished else None
            return [
                completion_chunk(rid, created, model, completion_choice(choice.index, text, logprobs, reason))
            ]

        return await stream_choices(request, state.generator, inputs, spec, make_chunks)
    try:
        choices = await collect_choices(state.generator, inputs, req.n)
    except GenerationError as exc:
        return openai_error(exc)
    body_choices = []
    for c in choices:
        echo = echo_texts[c.index // req.n]
        logprobs = None if req.logprobs is None else choice_logprobs(c, echo, decode, with_top)
        body_choices.append(completion_choice(c.index, (echo or "") + c.text, logprobs, c.finish_reason))
    usage = aggregate_usage(choices, req.n, [len(i) for i in ids])
    return web.json_response(completion_response(rid, created, model, body_choices, usage))
