"""The router's TextGenerator (router/serving/generator_api.py): validation, dispatch, text, metrics.

    async for event in state.generator.stream(GenerateInput(rid, ids, {"max_new_tokens": 8})): ...
    events = [e async for e in state.generator.stream(inp, buffered=True)]   # one event per sample

Rules (beyond generator_api.py's):
- the request is checked before it leaves the router, against the model facts its workers
  reported: the worker's own validation (same code, shared/engine/request_validation.py), plus
  SGLang's check that prompt + max_new_tokens (when given) fits the context. Problems are
  GenerationError 400 with the field named; no worker or tokenizer yet is 503;
- `buffered=True` is for consumers that show nothing until the end (non-streaming responses): each
  sample arrives as one finished event with everything, and a worker failing at any point of the
  request is retried on another worker from scratch (nothing was shown yet);
- when stop strings have ended every sample while the worker still runs some of them, the worker
  gets an AbortRequest (through dispatch's close) and the stream ends;
- each prompt takes a slot of the admission queue (router/serving/admission.py) before it is sent and gives
  it back when its stream closes (finished, failed, aborted, cancelled); while it waits for one it
  is queued: 429 when the queue is full, 504 past `--request-timeout`;
- metrics: time to first token (first output with tokens), gaps between outputs, end-to-end
  latency and token counts of each request that completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.router.serving.dispatch import RESTART
from pdserve.router.serving.generator_api import EventSink, GenerateInput, GenerationError, SampleEvent
from pdserve.router.serving.sample_tracker import SampleTracker
from pdserve.router.text.tokenizer_fast import fast_decoder
from pdserve.shared.engine.request_validation import RequestError, validate_request
from pdserve.shared.protocol import GenerateRequest, RequestOutput

if TYPE_CHECKING:
    from pdserve.router.state import RouterState


def context_overflow_message(prompt_len: int, max_new_tokens: int, context_length: int) -> str:
    return (
        f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
        f"You requested a total of {prompt_len + max_new_tokens} tokens: {prompt_len} tokens from the "
        f"input and {max_new_tokens} tokens for the completion."
    )


class RouterTextGenerator:
    def __init__(self, state: RouterState):
        self._state = state

    def check(self, inp: GenerateInput) -> GenerateRequest:
        """The worker message for inp, after the router-side checks (GenerationError 400/503)."""
        facts = self._state.require_generation()
        if inp.sampling_params is not None and not isinstance(inp.sampling_params, dict):
            raise GenerationError(400, "sampling_params must be an object.")
        # --preferred-sampling-params are defaults: what the request sets wins
        params_in = {**(self._state.preferred_sampling_params or {}), **(inp.sampling_params or {})}
        msg = GenerateRequest(
            rid=inp.rid,
            input_ids=inp.input_ids,
            sampling_params=params_in,
            return_logprob=inp.return_logprob,
            top_logprobs_num=inp.top_logprobs_num,
            logprob_start_len=inp.logprob_start_len,
            token_ids_logprob=inp.token_ids_logprob,
        )
        if not isinstance(inp.rid, str) or not inp.rid:
            raise GenerationError(400, "rid must be a non-empty string.")
        if isinstance(inp.input_ids, list) and len(inp.input_ids) >= facts.context_length > 0:
            raise GenerationError(
                400,
                f"The input ({len(inp.input_ids)} tokens) is longer than the model's context length "
                f"({facts.context_length} tokens).",
            )
        try:
            params = validate_request(
                msg, facts.vocab_size, facts.context_length, self._state.pool_tokens or 1 << 62
            )
        except RequestError as exc:
            raise GenerationError(400, str(exc)) from None
        if not isinstance(inp.return_text_in_logprobs, bool):
            raise GenerationError(400, "return_text_in_logprobs must be a boolean.")
        explicit_max = params_in.get("max_new_tokens")
        if explicit_max is not None and len(inp.input_ids) + params.max_new_tokens >= facts.context_length:
            raise GenerationError(
                400, context_overflow_message(len(inp.input_ids), params.max_new_tokens, facts.context_length)
            )
        return msg

    async def abort(self, rid: str) -> None:
        self._state.dispatcher.abort(rid)

    async def stream(
        self,
        inp: GenerateInput,
        buffered: bool = False,
        checked: GenerateRequest | None = None,
        sink: EventSink | None = None,
    ) -> AsyncIterator[SampleEvent]:
        """`checked`: what `check(inp)` returned, when the caller checked inp already; `sink`:
        where ordinary events go at once (generator_api.py's EventSink; not with `buffered`)."""
        msg = checked if checked is not None else self.check(inp)
        tokenizer = self._state.require_tokenizer()
        num_samples = int(msg.sampling_params.get("n", 1))
        metrics = self._state.metrics
        decoder = fast_decoder(tokenizer)  # shared by the samples' trackers

        def fresh() -> list[SampleTracker]:
            return [
                SampleTracker(
                    i, tokenizer, msg.sampling_params, inp.return_text_in_logprobs, decoder, buffered
                )
                for i in range(num_samples)
            ]

        start = time.perf_counter()  # latencies include the time waited in the router's queue
        # a slot of the cluster's running requests (router/serving/admission_gate.py): 429 when the queue is
        # full, 504 past --request-timeout; admitted at once, this does not yield to the loop
        ticket = await self._state.admission.acquire(inp.priority)
        try:
            # The trackers are built while the worker computes: this callback runs once the handler
            # waits for the first output, after the request was sent (the handler does not yield to
            # the loop before that). The first output builds them if it somehow came first.
            samples: list[SampleTracker] = []
            asyncio.get_running_loop().call_soon(lambda: samples or samples.extend(fresh()))
            unfinished = num_samples
            last_output_at: float | None = None

            def observe_gap() -> None:
                nonlocal last_output_at
                now = time.perf_counter()
                if last_output_at is None:
                    metrics.ttft.observe(now - start)
                else:
                    metrics.itl.observe(now - last_output_at)
                last_output_at = now

            def take_inline(out: RequestOutput) -> bool:
                # an output the loop below would turn into one event of a sample that goes on
                # (a sample with stop strings may end at any token: the loop's way)
                if not samples or sink is None or not sink.ready():
                    return False
                tracker = samples[out.index]
                if tracker.done or tracker.has_stop_strings:
                    return False
                if out.token_ids:
                    observe_gap()
                sink.deliver(tracker.apply(out))
                return True

            metrics.running.inc()
            try:
                outputs = self._state.dispatcher.run(
                    msg,
                    num_samples,
                    restartable=buffered,
                    inline=take_inline if sink and not buffered else None,
                )
                async with contextlib.aclosing(outputs):
                    async for item in outputs:
                        if item is RESTART:
                            samples[:] = fresh()
                            unfinished = num_samples
                            continue
                        if not samples:
                            samples.extend(fresh())
                        if item.token_ids:
                            observe_gap()
                        tracker = samples[item.index]
                        if tracker.done:
                            continue  # a stop string ended it; the worker's later outputs are dropped
                        if buffered:
                            tracker.absorb(item)
                        else:
                            yield tracker.apply(item)
                        if tracker.done:
                            unfinished -= 1
                            if not unfinished:
                                break  # leaving aborts what the worker still runs (stop strings)
                if buffered:
                    for tracker in samples:
                        yield tracker.summary_event()
            finally:
                metrics.running.dec()
                if not unfinished:
                    metrics.observe_request_done(
                        time.perf_counter() - start,
                        sum(s.prompt_tokens for s in samples[:1]),
                        sum(len(s.output_ids) for s in samples),
                        sum(s.cached_tokens for s in samples[:1]),
                    )
        finally:
            self._state.admission.release(ticket)  # admits the next queued request
