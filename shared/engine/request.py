"""A request's state inside one engine: stored counters, derived properties, an ordered status.

Invariant: the KV of `fill_ids[:num_computed]` is in the pool, in `pages` (page j holds tokens
j*page_size .. j*page_size+page_size-1). A forward step computes `fill_ids[num_computed:...]`; a step
that reaches the end of `fill_ids` samples one token, appended to `output_ids`. Decode is the case
where exactly one token (the last sampled one) is missing from the pool. With overlap scheduling
a decode step is planned while the previous one still runs: `num_computed` then counts the KV that
step is writing, and `tokens_in_flight` the tokens it sampled that are not in `output_ids` yet.
Retraction frees the pages and sets `num_computed` to 0: the next prefill recomputes prompt and
outputs together.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdserve.shared.engine.sampling_params import SamplingParams


class ReqStatus(enum.IntEnum):
    WAITING = 1  # queued; nothing of it in the pool (new, or retracted)
    WAITING_FOR_KV = 2  # decode role: pages allocated, KV arriving from a prefill worker
    PREFILLING = 3  # part of the prompt computed (chunked prefill in progress)
    TRANSFERRING = 4  # prefill role: prompt computed, first token sampled, KV pages on their way to decode
    RUNNING = 5  # in the decode batch
    FINISHED = 6


class TokenGrammar(Protocol):
    """A sample's grammar matcher (shared/engine/grammar.py), seen without torch or xgrammar."""

    rejected: bool  # a token it could not accept was appended (the request is ended for it)

    def accept(self, token: int) -> bool: ...

    def is_terminated(self) -> bool: ...

    def fill(self, bitmask: Any, row: int) -> None: ...

    def forced_string(self) -> str: ...

    def rollback(self, num_tokens: int) -> None: ...


@dataclass(eq=False)  # identity, not field-wise, equality: queues remove by identity
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the n samples of request `rid` this is
    # Samples 1..n-1 of an n>1 request wait for sample 0's prompt pages and share them through the cache.
    share_prompt_with: Req | None = None
    eos_token_ids: frozenset[int] = frozenset()
    grammar: TokenGrammar | None = None  # constrained decoding: in step with output_ids
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no prompt logprobs
    token_ids_logprob: list[int] | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    status: ReqStatus = ReqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    # Overlap scheduling: tokens sampled by a decode step still running on the device, not yet in
    # output_ids (the host reads them one step later). Counted so the next step can be planned.
    tokens_in_flight: int = 0
    cached_tokens: int = 0  # prompt tokens served from the radix cache (first admission)
    prefix_node: Any = None  # radix handle locked while this request holds cached pages
    finish_reason: dict[str, Any] | None = None
    num_retractions: int = 0
    num_sent: int = 0  # output tokens already reported to the client
    reported: bool = False  # at least one output went out (prompt logprobs travel with the first)
    last_output_at: float = 0.0  # monotonic time of its last output with tokens (latency_stats.py)
    # an embedding request (shared/engine/embedding.py): its pooled vector once its prompt is computed
    wants_embedding: bool = False
    embedding: list[float] | None = None

    # logprobs accumulated for the client; (logprob, token_id) pairs, top lists as [(lp, id), ...]
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    input_token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    input_logprobs_done: bool = False
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    output_token_ids_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def seq_len_with_in_flight(self) -> int:
        """seq_len plus the tokens sampled on the device that the host has not read yet."""
        return self.seq_len + self.tokens_in_flight

    @property
    def remaining_fill(self) -> int:
        """Tokens whose KV must still be computed before the next token can be sampled."""
        return self.seq_len - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == ReqStatus.FINISHED

    @property
    def wants_input_logprobs(self) -> bool:
        return (
            self.return_logprob
            and 0 <= self.logprob_start_len < len(self.input_ids)
            and not self.input_logprobs_done
        )

    @property
    def max_seq_len(self) -> int:
        """Upper bound of tokens this request can ever hold in the pool."""
        return len(self.input_ids) + self.params.max_new_tokens

    def append_output(self, token: int) -> None:
        """A new output token; the grammar, if any, advances over it."""
        self.output_ids.append(token)
        if self.grammar is not None:
            self.grammar.accept(token)

    def finish(self, reason: dict[str, Any]) -> None:
        self.finish_reason = reason
        self.status = ReqStatus.FINISHED


def resume(req: Req, generated_ids: list[int]) -> None:
    """Makes a new request continue one that generated `generated_ids` elsewhere (a moved request):
    they become its output, already reported, with no KV yet (like a retracted request, the first
    prefill computes prompt and outputs together). Their logprobs went out with the old request:
    placeholders keep the lists aligned with output_ids."""
    k = len(generated_ids)
    req.output_ids = list(generated_ids)
    req.num_sent = k
    req.output_token_logprobs = [(None, t) for t in generated_ids]  # type: ignore[misc]
    req.output_top_logprobs = [[] for _ in range(k)]
    req.output_token_ids_logprobs = [[] for _ in range(k)]
    req.input_logprobs_done = True
