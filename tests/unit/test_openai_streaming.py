"""OpenAI handler paths a real worker cannot be made to take on demand, over a scripted generator.

The routes run in a real aiohttp server; the generator replays scripted SampleEvents. Checked:
a failure after the first chunk becomes an `{"error": ...}` event then `[DONE]`; one before it is a
plain HTTP error with its status; a router abort (status_code) of a non-streaming request is that
error status; a client abort (/abort_request, no status) ends the choice with finish_reason
"abort"; non-streaming requests ask for buffered (retryable) events; the batch limit.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pdserve.router.openai.routes import add_openai_routes
from pdserve.router.serving.generator_api import GenerationError, SampleEvent
from pdserve.router.state import STATE_KEY
from pdserve.router.text.tokenizer_fast import fast_encoder
from tests.helpers.tiny_models import _byte_tokenizer

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _ev(delta: str, text: str, finished: bool = False, reason: dict | None = None) -> SampleEvent:
    return SampleEvent(
        0, text, delta, [1], [1], finished, reason, prompt_tokens=3, completion_tokens=len(text)
    )


@dataclass
class ScriptedGenerator:
    script: list[SampleEvent | Exception]
    seen: list = field(default_factory=list)

    async def stream(self, inp, buffered: bool = False, sink=None):  # yields every event: sink is optional
        self.seen.append((inp, buffered))
        for item in self.script:
            await asyncio.sleep(0)
            if isinstance(item, Exception):
                raise item
            yield item

    async def abort(self, rid: str) -> None:
        pass


class FakeState:
    """The parts of RouterState the OpenAI routes read."""

    def __init__(self, generator: ScriptedGenerator):
        self.generator = generator
        self.tokenizer = _byte_tokenizer()
        self.chat_template = None
        self.model_name = "scripted"
        self.model_path = "/scripted"
        self.args = SimpleNamespace(max_batch_size=4, tool_call_parser=None, reasoning_parser=None)

    def require_ready(self):
        return SimpleNamespace(context_length=64)

    require_generation = require_ready

    def require_tokenizer(self):
        return self.tokenizer

    def encoder(self, add_special_tokens: bool = True):
        return fast_encoder(self.tokenizer, add_special_tokens)


def _post(script, path: str, body: dict) -> tuple[int, str]:
    async def run():
        app = web.Application()
        app[STATE_KEY] = FakeState(ScriptedGenerator(script))  # type: ignore[assignment]
        add_openai_routes(app)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post(path, json=body)
            return resp.status, await resp.text()

    return asyncio.run(run())


def _events(text: str) -> list:
    return [
        "[DONE]" if line == "data: [DONE]" else json.loads(line[len("data: ") :])
        for line in text.split("\n\n")
        if line
    ]


def test_error_after_the_first_chunk_is_an_error_event():
    script = [_ev("He", "He"), GenerationError(503, "worker lost")]
    status, text = _post(script, "/v1/chat/completions", {**BODY, "stream": True})
    events = _events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"] == {"content": "He"}
    assert events[2] == {
        "error": {
            "object": "error",
            "message": "worker lost",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    }
    assert len(events) == 4


def test_router_abort_mid_stream_is_an_error_event():
    abort = {"type": "abort", "message": "Request timed out.", "status_code": 504}
    status, text = _post([_ev("a", "a"), _ev("", "a", True, abort)], "/v1/completions",
                         {"prompt": "x", "stream": True})  # fmt: skip
    events = _events(text)
    assert status == 200
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["code"] == 504 and events[1]["error"]["message"] == "Request timed out."
    assert events[2] == "[DONE]"


def test_error_before_the_first_chunk_is_a_plain_error():
    status, text = _post(
        [GenerationError(503, "no worker")], "/v1/chat/completions", {**BODY, "stream": True}
    )
    assert status == 503 and json.loads(text)["message"] == "no worker"


def test_router_abort_fails_a_non_streaming_request():
    abort = {"type": "abort", "message": "worker lost", "status_code": 503}
    status, text = _post([_ev("a", "a", True, abort)], "/v1/chat/completions", BODY)
    assert status == 503 and json.loads(text)["type"] == "ServiceUnavailableError"


def test_client_abort_ends_the_choice_normally():
    abort = {"type": "abort", "message": "Aborted by the client."}
    status, text = _post([_ev("ab", "ab", True, abort)], "/v1/completions", {"prompt": "x"})
    choice = json.loads(text)["choices"][0]
    assert status == 200 and choice["text"] == "ab" and choice["finish_reason"] == "abort"


def test_non_streaming_asks_for_buffered_events():
    gen = ScriptedGenerator([_ev("ok", "ok", True, {"type": "length", "length": 2})])

    async def run():
        app = web.Application()
        app[STATE_KEY] = FakeState(gen)  # type: ignore[assignment]
        add_openai_routes(app)
        async with TestClient(TestServer(app)) as client:
            whole = await (await client.post("/v1/chat/completions", json=BODY)).json()
            await (await client.post("/v1/chat/completions", json={**BODY, "stream": True})).read()
            return whole

    whole = asyncio.run(run())
    assert (
        whole["choices"][0]["message"]["content"] == "ok" and whole["choices"][0]["finish_reason"] == "length"
    )
    assert [buffered for _, buffered in gen.seen] == [True, False]
    inp = gen.seen[0][0]
    assert inp.sampling_params == {"n": 1, "max_new_tokens": 4} and inp.rid.startswith("chatcmpl-")


def test_batch_limit():
    status, text = _post([], "/v1/completions", {"prompt": ["a"] * 5})
    assert status == 400 and "more than --max-batch-size 4" in json.loads(text)["message"]
