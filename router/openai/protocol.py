"""OpenAI request bodies -> validated requests -> `GenerateInput`s for the router's generator.

`parse_completion_request` and `parse_chat_request` are pure: they check every field a client sent
(400 naming the field on a bad one) without a tokenizer. Tokenization and the chat template happen
in the handlers; `make_generate_input` then checks the prompt against the context length and fills
in the generation budget.

Rules (SGLang's OpenAI server behaves the same):
- `model` is any string, echoed in responses: one router serves one model, so the name is not
  checked (clients that send "default" or a stale name keep working).
- Unknown fields are ignored (the official client sends extras through `extra_body`); fields pdserve
  cannot honour yet (`suffix`, constrained decoding) answer 400 by name.
- Chat `tools` / `tool_choice` are read by router/openai/tools.py; a forced choice adds its call
  schema to the sampling params. SGLang's `separate_reasoning` (default true) asks for the
  reasoning split when the router has a `--reasoning-parser`.
- `max_tokens` defaults to 16 for completions (OpenAI's default) and to "the rest of the context"
  for chat; `max_completion_tokens` wins over `max_tokens` when both are set.
- prompt tokens + `max_tokens` reaching the context length is a 400 that states both numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.router.openai.chat_template import normalize_messages
from pdserve.router.openai.params import (
    MAX_TOP_LOGPROBS,
    OpenAIRequestError,
    get_bool,
    get_dict,
    get_int,
    get_str,
    parse_stream_options,
    reject_unsupported,
    sampling_from_body,
)
from pdserve.router.openai.tools import ToolSpec, forced_sampling, parse_tools
from pdserve.router.serving.generator_api import GenerateInput

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class StreamOptions:
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # one entry per prompt: text, or token ids
    sampling: dict[str, Any]  # SamplingParams fields, max_new_tokens excluded
    max_tokens: int
    stream: StreamOptions
    logprobs: int | None  # top-k per token (0: the chosen token only); None: no logprobs
    echo: bool = False
    rid: list[str] | None = None

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    max_tokens: int | None  # None: up to the context length
    stream: StreamOptions
    logprobs: bool = False
    top_logprobs: int = 0
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    rid: str | None = None
    tools: ToolSpec | None = None
    separate_reasoning: bool = True

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise OpenAIRequestError("The request body must be a JSON object.")
    return body


def _stream_options(body: dict) -> StreamOptions:
    stream = get_bool(body, "stream")
    include_usage, continuous = parse_stream_options(body, stream)
    return StreamOptions(stream, include_usage, continuous)


def _parse_rids(value: Any, count: int) -> list[str] | None:
    """SGLang's `rid` extra: a string for one prompt, a list of strings for a batch."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(r, str) and r for r in value) or len(value) != count:
        raise OpenAIRequestError(f"rid must be a non-empty string or a list of {count} strings.", "rid")
    return value


def parse_prompts(value: Any) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if value is None:
        raise OpenAIRequestError("prompt is required.", "prompt")
    if isinstance(value, str):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_token_id(t) for t in value):
        prompts = [value]
    elif isinstance(value, list) and value:
        prompts = value
    else:
        raise OpenAIRequestError(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids, "
            "and not empty.",
            "prompt",
        )
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise OpenAIRequestError("prompt must not be an empty string.", "prompt")
        elif not (isinstance(p, list) and p and all(_is_token_id(t) for t in p)):
            raise OpenAIRequestError(
                "Each prompt in a list must be a non-empty string or a non-empty list of token ids (ints >= 0).",
                "prompt",
            )
    return prompts


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _require_object(body)
    get_str(body, "model")
    prompts = parse_prompts(body.get("prompt"))
    if body.get("suffix"):
        raise OpenAIRequestError("suffix is not supported by pdserve.", "suffix")
    reject_unsupported(body)
    max_tokens = get_int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, lo=0)
    sampling = sampling_from_body(body, max_tokens)
    best_of = get_int(body, "best_of", lo=1)
    if best_of is not None and best_of != sampling["n"]:
        raise OpenAIRequestError("best_of other than n is not supported by pdserve.", "best_of")
    return CompletionRequest(
        model=body.get("model"),
        prompts=prompts,
        sampling=sampling,
        max_tokens=max_tokens,
        stream=_stream_options(body),
        logprobs=get_int(body, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS),
        echo=get_bool(body, "echo"),
        rid=_parse_rids(body.get("rid"), len(prompts)),
    )


def parse_chat_request(body: Any) -> ChatRequest:
    body = _require_object(body)
    get_str(body, "model")
    messages = normalize_messages(body.get("messages"))
    tools = parse_tools(body)
    reject_unsupported(body)
    max_tokens = get_int(body, "max_completion_tokens", lo=0)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", lo=0)
    sampling = sampling_from_body(body, max_tokens)
    sampling.update(forced_sampling(tools, sampling))
    logprobs = get_bool(body, "logprobs")
    top_logprobs = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise OpenAIRequestError("top_logprobs requires logprobs to be true.", "top_logprobs")
    continue_final = get_bool(body, "continue_final_message")
    add_generation_prompt = get_bool(body, "add_generation_prompt", not continue_final)
    if continue_final and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        raise OpenAIRequestError(
            "continue_final_message needs add_generation_prompt false and a final assistant message.",
            "continue_final_message",
        )
    rids = _parse_rids(body.get("rid"), 1)
    return ChatRequest(
        model=body.get("model"),
        messages=messages,
        sampling=sampling,
        max_tokens=max_tokens,
        stream=_stream_options(body),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        chat_template_kwargs=get_dict(body, "chat_template_kwargs") or {},
        rid=rids[0] if rids else None,
        tools=tools,
        separate_reasoning=get_bool(body, "separate_reasoning", True),
    )


def check_context(prompt_tokens: int, max_tokens: int | None, context_length: int) -> int:
    """The generation budget for a prompt: `max_tokens`, or the rest of the context when None.

    Like SGLang, prompt + max_tokens must stay below the context length (the last position is
    never generated into), so the default budget is `context_length - prompt_tokens - 1`.
    """
    if prompt_tokens >= context_length:
        raise OpenAIRequestError(
            f"The input ({prompt_tokens} tokens) is longer than the model's context length "
            f"({context_length} tokens).",
            "messages" if max_tokens is None else None,
        )
    if max_tokens is None:
        return max(context_length - prompt_tokens - 1, 0)
    if prompt_tokens + max_tokens >= context_length:
        raise OpenAIRequestError(
            f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
            f"You requested a total of {prompt_tokens + max_tokens} tokens: {prompt_tokens} tokens from the "
            f"input and {max_tokens} tokens for the completion. Please reduce the number of tokens in the "
            "input or the completion to fit within the limit.",
            "max_tokens",
        )
    return max_tokens


def make_generate_input(
    rid: str,
    input_ids: list[int],
    sampling: dict[str, Any],
    max_tokens: int | None,
    context_length: int,
    top_logprobs: int | None = None,
    prompt_logprobs: bool = False,
) -> GenerateInput:
    """One prompt's GenerateInput. `top_logprobs` None: no logprobs; an int k: chosen token + top k.

    `prompt_logprobs` (completions `echo` with `logprobs`) asks for the prompt's logprobs from its
    first token on (SGLang's `logprob_start_len=0`).
    """
    budget = check_context(len(input_ids), max_tokens, context_length)
    return_logprob = top_logprobs is not None
    return GenerateInput(
        rid=rid,
        input_ids=input_ids,
        sampling_params={**sampling, "max_new_tokens": budget},
        return_logprob=return_logprob,
        top_logprobs_num=top_logprobs or 0,
        logprob_start_len=0 if (return_logprob and prompt_logprobs) else -1,
        return_text_in_logprobs=return_logprob,
    )
