"""The OpenAI layer's response side, pure: logprobs shapes, choices, chunks and usage, router aborts
as errors, and the merge of several prompts' streams."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.openai.logprobs import chat_logprobs_content, completion_logprobs
from pdserve.router.openai.protocol import (
    make_generate_input,
)
from pdserve.router.openai.responses import (
    ChoiceState,
    aggregate_usage,
    chat_choice,
    chat_chunk,
    completion_choice,
    usage_chunk,
)
from pdserve.router.openai.streaming import abort_error, merge_streams
from pdserve.router.serving.generator_api import GenerationError, SampleEvent

# ---------------------------------------------------------------- logprobs shapes


def _decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_completion_logprobs_shape():
    entries = [[None, 1, "Hel"], [-0.5, 2, "lo"], [-1.25, 3, None]]
    tops = [None, [[-0.5, 2, "lo"], [-2.0, 9, "p"]], [[-1.25, 3, None]]]
    out = completion_logprobs(entries, tops, _decode).to_dict()
    assert out == {
        "tokens": ["Hel", "lo", "<3>"],
        "token_logprobs": [None, -0.5, -1.25],
        "top_logprobs": [None, {"lo": -0.5, "p": -2.0}, {"<3>": -1.25}],
        "text_offset": [0, 3, 5],
    }
    assert completion_logprobs(entries[1:], None, _decode, start_offset=10, with_top=False).to_dict() == {
        "tokens": ["lo", "<3>"],
        "token_logprobs": [-0.5, -1.25],
        "top_logprobs": [],
        "text_offset": [10, 12],
    }
    # top lists asked for but not sent for some tokens: None keeps the lists aligned
    assert completion_logprobs(entries[:2], None, _decode).top_logprobs == [None, None]


def test_chat_logprobs_shape():
    content = chat_logprobs_content([[-0.5, 2, "é"]], [[[-0.5, 2, "é"], [-1.0, 7, "e"]]], _decode)
    assert content == [
        {
            "token": "é",
            "logprob": -0.5,
            "bytes": [195, 169],
            "top_logprobs": [
                {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                {"token": "e", "logprob": -1.0, "bytes": [101]},
            ],
        }
    ]
    assert chat_logprobs_content([[-0.1, 4, None]], None, _decode)[0]["top_logprobs"] == []


# ---------------------------------------------------------------- responses


def _event(index=0, text="", delta="", finished=False, reason=None, **kw) -> SampleEvent:
    return SampleEvent(index=index, text=text, text_delta=delta, token_ids=[], output_ids=[], finished=finished,
                       finish_reason=reason, **kw)  # fmt: skip


def test_choice_state_accumulates():
    c = ChoiceState(0)
    c.add(
        _event(
            text="a", delta="a", prompt_tokens=5, completion_tokens=1, output_token_logprobs=[[-1.0, 4, "a"]]
        )
    )
    c.add(
        _event(
            text="ab",
            delta="b",
            finished=True,
            reason={"type": "stop", "matched": 2},
            prompt_tokens=5,
            completion_tokens=2,
            cached_tokens=3,
            output_token_logprobs=[[-2.0, 5, "b"]],
        )
    )
    assert c.text == "ab" and c.finished and c.completion_tokens == 2 and c.cached_tokens == 3
    assert c.token_logprobs == [[-1.0, 4, "a"], [-2.0, 5, "b"]] and c.top_logprobs == [None, None]


def test_usage_counts_each_prompt_once():
    n = 2
    choices = [ChoiceState(i, prompt_tokens=p, completion_tokens=k, cached_tokens=c)
               for i, (p, k, c) in enumerate([(5, 3, 4), (5, 4, 5), (7, 1, 0), (7, 2, 7)])]  # fmt: skip
    assert aggregate_usage(choices, n, [5, 7]) == {
        "prompt_tokens": 12,
        "completion_tokens": 10,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    # a prompt whose choices saw no event yet counts from its token ids
    assert aggregate_usage([ChoiceState(0)], 1, [9])["prompt_tokens"] == 9


def test_choice_and_chunk_shapes():
    assert completion_choice(1, "x", None, {"type": "length", "length": 4}) == {
        "index": 1, "text": "x", "logprobs": None, "finish_reason": "length", "matched_stop": None,
    }  # fmt: skip
    assert chat_choice(0, "Paris", None, {"type": "stop", "matched": 2}) == {
        "index": 0,
        "message": {"role": "assistant", "content": "Paris", "reasoning_content": None, "tool_calls": None},
        "logprobs": None,
        "finish_reason": "stop",
        "matched_stop": 2,
    }
    assert chat_choice(0, "", [], {"type": "stop", "matched": "END"})["logprobs"] == {"content": []}
    assert chat_choice(0, "", [], {"type": "stop", "matched": "END"})["matched_stop"] == "END"
    assert chat_chunk("id", 7, "m", 2, {"content": "P"}) == {
        "id": "id",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 2, "delta": {"content": "P"}, "logprobs": None, "finish_reason": None,
                     "matched_stop": None}],
        "usage": None,
    }  # fmt: skip
    assert usage_chunk("id", 7, "m", "text_completion", {"x": 1}) == {
        "id": "id", "object": "text_completion", "created": 7, "model": "m", "choices": [], "usage": {"x": 1},
    }  # fmt: skip


def test_router_aborts_become_errors_client_aborts_do_not():
    assert abort_error({"type": "stop", "matched": 1}) is None and abort_error(None) is None
    err = abort_error({"type": "abort", "message": "worker lost", "status_code": 503})
    assert err.status == 503 and err.message == "worker lost" and err.err_type == "ServiceUnavailableError"
    assert abort_error({"type": "abort", "message": "timeout", "status_code": 504}).err_type == "TimeoutError"
    assert abort_error({"type": "abort", "message": "Aborted by the client."}) is None


# ---------------------------------------------------------------- merging prompt streams


class ScriptedGenerator:
    """Yields each rid's scripted events with a pause between them; records which streams were closed."""

    def __init__(self, script: dict[str, list[SampleEvent | Exception]]):
        self.script = script
        self.closed: list[str] = []

    async def stream(self, inp, buffered: bool = False):
        try:
            for item in self.script[inp.rid]:
                await asyncio.sleep(0.001)
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed.append(inp.rid)

    async def abort(self, rid: str) -> None:
        pass


def _inputs(*rids):
    return [make_generate_input(r, [1], {}, 1, 10) for r in rids]


def test_merge_streams_interleaves_all_prompts():
    gen = ScriptedGenerator({"a": [_event(delta="a1"), _event(delta="a2", finished=True)],
                             "b": [_event(delta="b1", finished=True)]})  # fmt: skip

    async def run():
        return [(p, ev.text_delta) async for p, ev in merge_streams(gen, _inputs("a", "b"))]

    got = asyncio.run(run())
    assert sorted(got) == [(0, "a1"), (0, "a2"), (1, "b1")]
    assert [d for p, d in got if p == 0] == ["a1", "a2"]
    assert sorted(gen.closed) == ["a", "b"]


def test_merge_streams_raises_and_closes_the_others():
    gen = ScriptedGenerator({"a": [_event(delta="a1")] * 50, "b": [GenerationError(400, "bad prompt")]})

    async def run():
        async for _ in merge_streams(gen, _inputs("a", "b")):
            pass

    with pytest.raises(GenerationError, match="bad prompt"):
        asyncio.run(run())
    assert sorted(gen.closed) == ["a", "b"]  # "a" was cancelled before its 50 events
