"""The router's internal generation interface: what the HTTP layers (native, OpenAI) call.

The native `/generate` handler and the OpenAI handlers both turn their request into one
`GenerateInput` per prompt and consume `SampleEvent`s from `TextGenerator.stream`. Below that line
sit dispatch (worker choice, retries, circuit breaking), the ZMQ connections to workers,
incremental detokenization and stop strings; above it, only request parsing and response shapes.

Rules:
- `stream()` yields events for every sample index 0..n-1 interleaved, in arrival order; each sample
  ends with exactly one event with `finished=True`.
- Text is cumulative per sample in `text` and incremental in `text_delta`; stop strings are applied
  before the text is exposed (the matched stop string is trimmed unless `no_stop_trim`), so a
  client never sees text past a stop.
- Logprob lists in an event hold only the entries new since the previous event of that sample,
  each entry `[logprob, token_id, token_text_or_None]` as SGLang returns them (`token_text` set
  when `return_text_in_logprobs`).
- Errors: `GenerationError(status, message)`; raised before the first event for problems the client
  caused (status 400) or that leave no worker able to serve (503); after the first event a failure
  ends the affected samples with finish_reason {"type": "abort", "message": ...} instead.
- An error's type (the `type` of its OpenAI-shaped body, router/http/errors.py) is named after the
  `openai` package's exception class for the status where it has one (BadRequestError,
  ConflictError, UnprocessableEntityError, ...), else after the HTTP reason phrase; a status without
  an entry falls back to the class of its range, so no answer ever says just "Error".
- Cancelling the consumer (client disconnect) aborts the request on the worker.
- A consumer may also pass an `EventSink`: ordinary events mid-stream then go to it at once,
  synchronously, instead of through the iterator (first and last events, errors and anything the
  sink is not ready for still come through the iterator, in order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

STATUS_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    499: "ClientClosedRequestError",  # nginx's code for a client that left; counted, never sent
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def error_type(status: int) -> str:
    """The OpenAI-style error type of an HTTP status (the `openai` client's classes for 4xx/5xx)."""
    if status in STATUS_TYPES:
        return STATUS_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


class GenerationError(Exception):
    def __init__(
        self, status: int, message: str, err_type: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or error_type(status)
        self.headers = headers or {}  # of the error response (Retry-After of a 429)


@dataclass
class GenerateInput:
    """One tokenized prompt with its sampling parameters (SamplingParams field names), as the client
    sent them: unchecked (sampling_params may not even be an object), before --preferred-sampling-params
    apply. `RouterTextGenerator.check` turns it into the wire's GenerateRequest or a 400; the fields only
    the router reads (priority, return_text_in_logprobs) never travel."""

    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    priority: int | None = None  # the router's admission queue order (router/serving/admission.py)


@dataclass
class SampleEvent:
    index: int
    text: str  # cumulative text of this sample (after stop-string handling)
    text_delta: str
    token_ids: list[int]  # new output ids of this event
    output_ids: list[int]  # cumulative output ids
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    output_token_logprobs: list[list[Any]] | None = None
    output_top_logprobs: list[list[list[Any]] | None] | None = None
    output_token_ids_logprobs: list[list[list[Any]] | None] | None = None
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[list[list[Any]] | None] | None = None
    input_token_ids_logprobs: list[list[list[Any]] | None] | None = None


class EventSink(Protocol):
    """A consumer that can take a stream's events synchronously, where its tokens arrive (the
    handler's writer; router/serving/inbox.py says why). Events it takes are not yielded by `stream()`."""

    def ready(self) -> bool:
        """Whether `deliver` can take an event now (for a writer: headers sent, socket not full)."""
        ...

    def deliver(self, event: SampleEvent) -> None: ...


class TextGenerator(Protocol):
    async def stream(
        self, inp: GenerateInput, sink: EventSink | None = None
    ) -> AsyncIterator[SampleEvent]: ...

    async def abort(self, rid: str) -> None: ...
