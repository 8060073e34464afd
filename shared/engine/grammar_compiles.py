"""Grammars compiled off the request path: one small compile thread per engine, and the requests
that wait for it.

    compiles = GrammarCompiles(scheduler, tokenizer_path, vocab_size, eos_token_ids)  # the engine's
    compiles.attach(samples, scheduler.add)             # intake: matchers now, or park until compiled
    outputs = compiles.poll(engine.abort)               # each step: release the compiled, end the failed

A request whose grammar is cached (or that has none) gets its matchers at intake and is queued at
once, with no thread hop. A new grammar is compiled by the engine's one compile thread while its
request waits in the scheduler's `compiling` queue (request_queues.py): admitted to no batch,
counted as waiting, abortable like any queued request, while the other requests keep stepping.
When the compile ends, `poll` (at the start of every engine step) caches the result, gives each
waiting sample its matcher, advances it over the tokens the request already carries (a moved
request's `generated_ids`) and queues the samples where the caller said (`enqueue`: the waiting
queue, or the decode role's pre-allocation queue, so a decode worker names its pages, and applies
the prefill side's first token to the matcher, only once the matcher exists). A compile that
fails ends its request through the engine's `abort` (each role answers an abort its own way: a
prefill worker with PrefillDone(ok=False)), with xgrammar's reason as the message and as the
outputs' `error`, which is what a refusal at intake carries (the router answers it with a 400).
The n samples of a request share one compile, and so do requests that bring the same uncompiled
grammar while it compiles.

Measured on the dev box (2 cores, SmolLM2-135M's 49k vocabulary): a 96-property nested schema
(36 KB) compiles in 0.6 s, and a busy Python loop in the main thread kept its full speed (10-12 M
iterations/s, alone or beside the compile): xgrammar's compile releases the GIL, so a thread is
enough and the loop stepping the model is not slowed by it beyond the core it takes. One thread
per engine: compiles are rare (the cache holds 256 grammars) and a second would take a core from
the forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.shared.engine.grammar import GrammarBackend, SampleGrammar, advance_over, grammar_source
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import RequestOutput

if TYPE_CHECKING:
    from pdserve.shared.engine.request_queues import RequestQueues

INTERNAL_ERROR_PREFIX = "Internal error"  # the router retries such an end elsewhere (dispatch.py)
# How long an engine step with nothing to compute waits for a compile to end, so that a caller
# stepping in a loop (an offline generate) sleeps instead of spinning beside the compile thread.
IDLE_WAIT_S = 0.002


@dataclass
class _Parked:
    key: tuple[str, str]
    samples: list[Req]
    enqueue: Callable[[Req], None]


class GrammarCompiles:
    """`queues` holds the waiting requests (the scheduler); the other arguments are the backend's
    (grammar.py: it compiles and caches)."""

    def __init__(
        self,
        queues: RequestQueues,
        tokenizer_path: str,
        vocab_size: int,
        stop_token_ids: frozenset[int],
        trust_remote_code: bool = False,
    ):
        self.backend = GrammarBackend(tokenizer_path, vocab_size, stop_token_ids, trust_remote_code)
        self._queues = queues
        self._executor: ThreadPoolExecutor | None = None  # started by the first compile
        self._running: dict[tuple[str, str], Future[Any]] = {}
        self._parked: list[_Parked] = []
        self.num_compiles = 0  # compiles started (cache misses not already compiling)

    def attach(self, samples: list[Req], enqueue: Callable[[Req], None]) -> None:
        """Gives a new request's samples their matchers and queues each with `enqueue` when the
        grammar is cached (or there is none); else parks them until its compile ends (`poll`)."""
        key = grammar_source(samples[0].params)
        compiled = None if key is None else self.backend.cached(key)
        if key is None or compiled is not None:
            self._release(samples, compiled, enqueue)
            return
        if key not in self._running:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
            self._running[key] = self._executor.submit(self.backend.compile, *key)
            self.num_compiles += 1
        self._parked.append(_Parked(key, samples, enqueue))
        for req in samples:
            self._queues.park(req)

    def poll(self, abort: Callable[[str, str], list[RequestOutput]]) -> list[RequestOutput]:
        """Releases the requests whose compile ended and ends, with `abort(rid, message)`, those
        whose grammar failed; returns the outputs of those ends, each carrying the message as its
        `error` (as a refusal at intake does) unless the failure was internal. Waits up to
        IDLE_WAIT_S for a compile when requests wait for one and the queues have nothing to compute."""
        if not self._running:
            return []
        if not self._queues.has_compute():
            wait(list(self._running.values()), timeout=IDLE_WAIT_S, return_when=FIRST_COMPLETED)
        done = {key: future for key, future in self._running.items() if future.done()}
        for key, future in done.items():
            del self._running[key]
            if future.exception() is None:
                self.backend.store(key, future.result())
        ended: list[RequestOutput] = []
        waiting: list[_Parked] = []
        for parked in self._parked:
            compiled = done.get(parked.key)
            live = [r for r in parked.samples if not r.is_finished]  # aborted while compiling: dropped
            if compiled is None and live:
                waiting.append(parked)
            elif compiled is not None and live:
                error = compiled.exception()
                if error is None:
                    for req in live:
                        self._queues.unpark(req)
                    self._release(live, compiled.result(), parked.enqueue)
                else:
                    ended += _refusals(abort(live[0].rid, _message(error)), error)
        self._parked = waiting
        return ended

    def _release(self, samples: list[Req], compiled: Any, enqueue: Callable[[Req], None]) -> None:
        for req in samples:
            if compiled is not None:
                req.grammar = SampleGrammar(compiled)
                advance_over([req.grammar], req.output_ids)
            enqueue(req)


def _refusals(outputs: list[RequestOutput], error: BaseException) -> list[RequestOutput]:
    if isinstance(error, RequestError):
        for out in outputs:
            out.error = str(error)
    return outputs


def _message(error: BaseException) -> str:
    """The client's message for a failed compile: xgrammar's reason (grammar.py), or an internal
    error, which the router treats as the worker's failure rather than the request's."""
    if isinstance(error, RequestError):
        return str(error)
    return f"{INTERNAL_ERROR_PREFIX} compiling the grammar: {type(error).__name__}: {error}"
