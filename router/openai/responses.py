"""Response and chunk bodies of the OpenAI routes, in SGLang's shapes (seed 003 shows real ones).

Rules:
- Every choice carries `finish_reason` ("stop", "length", or None while streaming) and SGLang's
  `matched_stop`: the stop token id or stop string that ended it, None otherwise.
- Usage: `prompt_tokens` counts each prompt once however many samples (`n`) it has,
  `completion_tokens` sums every choice, `prompt_tokens_details.cached_tokens` counts the prompt
  tokens served from the prefix cache (again once per prompt: sample 0's count).
- Streaming chunks carry `usage: null`; with `stream_options.include_usage` a last chunk with no
  choices carries the usage (and with `continuous_usage_stats` every chunk carries the running one).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.router.http.errors import error_body
from pdserve.router.serving.generator_api import SampleEvent


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason_name(reason: dict[str, Any] | None) -> str | None:
    return None if reason is None else reason.get("type")


def matched_stop(reason: dict[str, Any] | None) -> int | str | None:
    if reason is None or reason.get("type") != "stop":
        return None
    return reason.get("matched")


@dataclass
class ChoiceState:
    """What one choice (prompt p, sample s -> index p * n + s) has gathered from its events."""

    index: int
    text: str = ""
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    started: bool = False  # a chunk of this choice was sent (streaming: role / echo go first)
    token_logprobs: list[list[Any]] = field(default_factory=list)
    top_logprobs: list[Any] = field(default_factory=list)
    input_token_logprobs: list[list[Any]] = field(default_factory=list)
    input_top_logprobs: list[Any] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, ev: SampleEvent) -> None:
        self.text = ev.text
        self.prompt_tokens = max(self.prompt_tokens, ev.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, ev.completion_tokens, len(ev.output_ids))
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)
        if ev.finished:
            self.finish_reason = ev.finish_reason or {"type": "stop", "matched": None}
        if ev.output_token_logprobs:
            self.token_logprobs.extend(ev.output_token_logprobs)
            self.top_logprobs.extend(ev.output_top_logprobs or [None] * len(ev.output_token_logprobs))
        if ev.input_token_logprobs:
            self.input_token_logprobs.extend(ev.input_token_logprobs)
            self.input_top_logprobs.extend(ev.input_top_logprobs or [None] * len(ev.input_token_logprobs))


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def aggregate_usage(choices: list[ChoiceState], n: int, prompt_lens: list[int]) -> dict[str, Any]:
    """Usage over all choices; `prompt_lens[p]` backs up a prompt whose events had no count yet."""
    prompt = sum(max(choices[p * n].prompt_tokens, prompt_lens[p]) for p in range(len(prompt_lens)))
    cached = sum(choices[p * n].cached_tokens for p in range(len(prompt_lens)))
    completion = sum(c.completion_tokens for c in choices)
    return usage_dict(prompt, completion, cached)


# ---------------------------------------------------------------- completions


def completion_choice(
    index: int, text: str, logprobs: dict[str, Any] | None, reason: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason_name(reason),
        "matched_stop": matched_stop(reason),
    }


def completion_response(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def completion_chunk(
    rid: str, created: int, model: str, choice: dict[str, Any], usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


# ---------------------------------------------------------------- chat


def chat_choice(
    index: int, content: str, logprobs: list[dict[str, Any]] | None, reason: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content, "reasoning_content": None, "tool_calls": None},
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason_name(reason),
        "matched_stop": matched_stop(reason),
    }


def chat_response(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    logprobs: list[dict[str, Any]] | None = None,
    reason: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason_name(reason),
                "matched_stop": matched_stop(reason),
            }
        ],
        "usage": usage,
    }


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `include_usage`: no choices, the whole request's usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def error_event(status: int, message: str, err_type: str | None = None) -> dict[str, Any]:
    """A streaming error after the first chunk: `data: {"error": {...}}`, then `data: [DONE]`."""
    return {"error": error_body(status, message, err_type)}
