"""Typed reads of OpenAI request fields, and the sampling parameters they map to.

Rules:
- A field that is absent or JSON `null` takes its default (OpenAI clients send `null` freely).
- A value of the wrong type or out of range raises `OpenAIRequestError` (HTTP 400) whose message
  names the OpenAI field and `param` is that field, so the official client shows which one failed.
- `stop` and `stop_token_ids` longer than router/text/stop_strings.py's limits are a 400 naming the limit.
- Only the fields a request sets are passed on (plus `n`), so `--preferred-sampling-params` (the
  router's defaults) apply to the rest.
- `sampling_from_body` maps OpenAI names to SGLang's `SamplingParams` names (`seed` -> `sampling_seed`,
  `min_tokens` -> `min_new_tokens`, ...) and validates the result with `SamplingParams` itself, so
  the router and the engine agree on every range. `max_new_tokens` is left to the caller: its
  default depends on the prompt length (chat) or on the endpoint (completions: 16).
"""

from __future__ import annotations

from typing import Any

from pdserve.router.text.stop_strings import StopLimitError, check_stop_limits
from pdserve.shared.engine.sampling_params import SamplingParams, SamplingParamsError

MAX_N = 128  # samples per prompt: more is a client bug, not a workload
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat `top_logprobs`; used for completions too

# OpenAI (or SGLang-extra) field -> SamplingParams field, for the fields passed straight through.
SAMPLING_FIELDS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "no_stop_trim": "no_stop_trim",
    "logit_bias": "logit_bias",
}

NUMERIC_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


# SGLang's constrained-decoding extras of the OpenAI bodies (response_format.py reads them).
CONSTRAINED_FIELDS = ("regex", "json_schema", "ebnf", "structural_tag")


class OpenAIRequestError(Exception):
    """A request the OpenAI layer refuses; `message` is safe to show the client."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def get_int(body: dict, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise OpenAIRequestError(f"{name} must be an integer, got {value!r}.", name)
    if lo is not None and value < lo:
        raise OpenAIRequestError(f"{name} must be >= {lo}, got {value}.", name)
    if hi is not None and value > hi:
        raise OpenAIRequestError(f"{name} must be <= {hi}, got {value}.", name)
    return value


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OpenAIRequestError(f"{name} must be a boolean, got {value!r}.", name)
    return value


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise OpenAIRequestError(f"{name} must be a string, got {type(value).__name__}.", name)
    return value


def get_dict(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is not None and not isinstance(value, dict):
        raise OpenAIRequestError(f"{name} must be an object, got {type(value).__name__}.", name)
    return value


def check_stop_sizes(stop: Any, stop_token_ids: Any) -> None:
    """OpenAIRequestError (400, param `stop` or `stop_token_ids`) for lists over the router's limits."""
    try:
        check_stop_limits(stop, stop_token_ids)
    except StopLimitError as exc:
        raise OpenAIRequestError(exc.message, exc.param) from None


def parse_stop(value: Any) -> list[str]:
    """`stop` as a string or a list of strings; empty strings are dropped (they would match at once)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    check_stop_sizes(value, None)  # before the list is walked
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise OpenAIRequestError("stop must be a string or a list of strings.", "stop")
    return [s for s in value if s]


def parse_stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); like SGLang, `stream_options` needs `stream: true`."""
    options = get_dict(body, "stream_options")
    if options is None:
        return False, False
    if not stream:
        raise OpenAIRequestError("stream_options can only be set when stream is true.", "stream_options")
    return get_bool(options, "include_usage"), get_bool(options, "continuous_usage_stats")


def reject_unsupported(body: dict) -> None:
    """Features pdserve does not serve yet answer 400 by name instead of being silently ignored
    (constrained decoding is served: response_format.py checks its fields)."""


def sampling_from_body(body: dict, max_tokens: int | None) -> dict[str, Any]:
    """SamplingParams fields (without `max_new_tokens`) from an OpenAI body; raises OpenAIRequestError.

    `max_tokens` (already read by the caller, None when the caller fills it in later) only takes part
    in the `min_tokens <= max_tokens` check.
    """
    check_stop_sizes(None, body.get("stop_token_ids"))
    sampling: dict[str, Any] = {}
    for openai_name, name in SAMPLING_FIELDS.items():
        if body.get(openai_name) is not None:
            sampling[name] = body[openai_name]
    if body.get("stop") is not None:  # absent: --preferred-sampling-params may set one
        sampling["stop"] = parse_stop(body["stop"])
    sampling["n"] = get_int(body, "n", 1, lo=1, hi=MAX_N)
    seed = get_int(body, "seed")
    if seed is not None:
        sampling["sampling_seed"] = seed
    min_tokens = get_int(body, "min_tokens", 0, lo=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise OpenAIRequestError(
            f"min_tokens must be <= max_tokens, got {min_tokens} > {max_tokens}.", "min_tokens"
        )
    if min_tokens:
        sampling["min_new_tokens"] = min_tokens
    # imported here: response_format.py raises this module's OpenAIRequestError
    from pdserve.router.openai.response_format import constraint_from_body

    sampling.update(constraint_from_body(body))
    check = dict(sampling, max_new_tokens=max_tokens if max_tokens is not None else 1 << 30)
    try:
        SamplingParams.from_dict(check)
    except SamplingParamsError as exc:
        message = str(exc)
        param = next((n for n in (*SAMPLING_FIELDS, "json_schema") if message.startswith(n)), None)
        raise OpenAIRequestError(message, param) from exc
    except TypeError as exc:  # a wrong type that reached the dataclass constructor
        raise OpenAIRequestError(f"Invalid sampling parameter: {exc}") from exc
    return sampling
