"""One sample of a native `/generate` request as the client sees it: cumulative text, output ids,
meta_info, and the bytes of its SSE chunks.

    view = SampleView(inp, index, num_samples, start, weight_version)
    view.update(event)                 # each SampleEvent of the sample, in order
    view.to_dict()                     # the response object (non-streaming, and the chunk's shape)
    await resp.write(view.sse_chunk(index_or_None))

Rules:
- `sse_chunk(index)` is byte for byte `sse.encode_event(chunk)` of `chunk = view.to_dict()` (plus
  `"index": index` when not None), built without re-encoding what did not change: the output ids
  are kept as a JSON fragment that grows with each event (a chunk is cumulative, so encoding the
  whole list again would cost O(length) Python work per token), the id and weight version are
  encoded once, and the few numbers of meta_info are formatted directly. Values that can take
  any shape (finish_reason, logprob lists) go through the same JSON encoder as encode_event;
- `e2e_latency` is set on the finished sample's chunks and body only.
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.router.http.sse import encode_json
from pdserve.router.serving.generator_api import GenerateInput, SampleEvent
from pdserve.router.serving.sample_tracker import LOGPROB_FIELDS

# Logprob fields always present when return_logprob is set; the others only when asked for.
_BASE_LOGPROB_FIELDS = ("input_token_logprobs", "output_token_logprobs")


class SampleView:
    """The cumulative state of one sample as the native API shows it."""

    def __init__(self, inp: GenerateInput, index: int, num_samples: int, start: float, weight_version: str):
        self.inp = inp
        self.sample_id = inp.rid if num_samples == 1 else f"{inp.rid}-{index}"
        self.start = start
        self.weight_version = weight_version
        self.text = ""
        self.output_ids: list[int] = []
        self.counts: tuple[int, int, int] | None = None  # prompt, completion, cached tokens
        self.logprobs: dict[str, list] = {}
        if inp.return_logprob:
            for name in _BASE_LOGPROB_FIELDS:
                self.logprobs[name] = []
            if inp.top_logprobs_num > 0:
                self.logprobs["input_top_logprobs"] = []
                self.logprobs["output_top_logprobs"] = []
            if inp.token_ids_logprob is not None:
                self.logprobs["input_token_ids_logprobs"] = []
                self.logprobs["output_token_ids_logprobs"] = []
        self.finished = False
        self.finish_reason: dict[str, Any] | None = None
        # sse_chunk's fragments: the ids so far as JSON list items ("1,2,3") and how many they are
        self._ids_json = ""
        self._ids_count = 0
        self._meta_head = '"meta_info":{"id":' + encode_json(self.sample_id) + ',"finish_reason":'
        self._meta_tail = ',"weight_version":' + encode_json(weight_version)

    def update(self, event: SampleEvent) -> None:
        self.text = event.text
        self.output_ids = event.output_ids
        self.finished = event.finished
        self.finish_reason = event.finish_reason
        self.counts = (event.prompt_tokens, event.completion_tokens, event.cached_tokens)
        if self.inp.return_logprob:
            for name in LOGPROB_FIELDS:
                values = getattr(event, name)
                if values is not None:
                    self.logprobs.setdefault(name, []).extend(values)

    def _e2e_latency(self) -> float:
        return round(time.perf_counter() - self.start, 6)

    def to_dict(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"id": self.sample_id, "finish_reason": self.finish_reason}
        if self.counts is not None:
            meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"] = self.counts
        meta["weight_version"] = self.weight_version
        if self.finished:
            meta["e2e_latency"] = self._e2e_latency()
        meta.update(self.logprobs)
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def sse_chunk(self, index: int | None = None) -> bytes:
        """`data: <to_dict() as JSON>\\n\\n` (with "index" when given); after update() only."""
        ids = self.output_ids
        added = len(ids) - self._ids_count
        if added > 0:  # the new ids are the tail of the cumulative list
            tail = ",".join(map(str, ids[self._ids_count :]))
            self._ids_json = f"{self._ids_json},{tail}" if self._ids_count else tail
        elif added < 0:  # cannot happen with in-order events; rebuild rather than trust the fragment
            self._ids_json = ",".join(map(str, ids))
        self._ids_count = len(ids)
        prompt, completion, cached = (_int_json(n) for n in self.counts)  # type: ignore[union-attr]
        parts = [
            'data: {"text":',
            encode_json(self.text),
            ',"output_ids":[',
            self._ids_json,
            "],",
            self._meta_head,
            "null" if self.finish_reason is None else encode_json(self.finish_reason),
            f',"prompt_tokens":{prompt},"completion_tokens":{completion},"cached_tokens":{cached}',
            self._meta_tail,
        ]
        if self.finished:
            parts += (',"e2e_latency":', repr(self._e2e_latency()))
        for name, values in self.logprobs.items():
            parts += (',"', name, '":', encode_json(values))
        parts.append("}")
        if index is not None:
            parts += (',"index":', _int_json(index))
        parts.append("}\n\n")
        return "".join(parts).encode()


def _int_json(value: Any) -> str:
    # int.__repr__ is what the JSON encoder writes for an int; anything else (a bool, say) goes
    # through the encoder so that the bytes stay equal to encode_event's
    return int.__repr__(value) if type(value) is int else encode_json(value)
