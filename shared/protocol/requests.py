"""Router -> worker: the request messages (a generation request, and the P/D pair's messages that
carry one), aborts and the queries every worker answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pdserve.shared.protocol.framing import Message

# ---------------------------------------------------------------- router -> worker


@dataclass
class GenerateRequest(Message):
    """A tokenized generation request. `sampling_params` uses SamplingParams' field names."""

    TAG: ClassVar[str] = "gen"
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    token_ids_logprob: list[int] | None = None
    stream: bool = True
    # Tokens this request already generated on a worker that died (the router moves a request that
    # streamed tokens to another worker): the engine holds them as its own output (their KV is
    # computed with the prompt's; they count against max/min_new_tokens, penalties and seeds) and
    # reports only the tokens after them. n must be 1.
    generated_ids: list[int] | None = None

    @property
    def request(self) -> GenerateRequest:
        """Itself: code that takes any RequestMessage reads the generation request the same way."""
        return self


@dataclass
class AbortRequest(Message):
    TAG: ClassVar[str] = "abort"
    rid: str
    message: str = "Aborted by the client."


@dataclass
class LoadQuery(Message):
    TAG: ClassVar[str] = "load?"
    query_id: int = 0


@dataclass
class FlushCacheRequest(Message):
    TAG: ClassVar[str] = "flush"
    query_id: int = 0


# ---------------------------------------------------------------- router -> prefill / decode worker


@dataclass
class PrefillRequest(Message):
    """For a prefill worker: prefill `request`, then send its KV pages (and the first token) to the
    decode worker at `decode_kv_endpoint`; answered by exactly one PrefillDone."""

    TAG: ClassVar[str] = "prefill"
    request: GenerateRequest
    decode_kv_endpoint: str
    decode_worker_id: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "request": self.request.to_wire()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> PrefillRequest:
        return cls(**{**data, "request": _request_from_wire(data)})


@dataclass
class DecodeRequest(Message):
    """For a decode worker: generate `request` from KV that the prefill worker at
    `prefill_kv_endpoint` sends; answered with RequestOutputs as a GenerateRequest is."""

    TAG: ClassVar[str] = "decode"
    request: GenerateRequest
    prefill_kv_endpoint: str
    prefill_worker_id: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "request": self.request.to_wire()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> DecodeRequest:
        return cls(**{**data, "request": _request_from_wire(data)})


def _request_from_wire(data: dict[str, Any]) -> GenerateRequest:
    request = data.get("request")
    if not isinstance(request, dict):
        raise TypeError(f"request must hold a GenerateRequest's fields, got {type(request).__name__}")
    return GenerateRequest(**request)


RequestMessage = GenerateRequest | PrefillRequest | DecodeRequest  # each answers .request
