"""OpenAI chat through a real router and a real worker, driven by the official `openai` client.

One `worker --role mixed` (tiny random Llama, CPU, float32) behind one `router --worker-addr`
(tests/helpers/openai_server.py). The native `/generate` of the same router is the oracle: greedy
outputs, token counts and logprobs of a chat request must equal those of the native request for the
same token ids (the chat prompt is the tokenizer's chat template, rendered here independently).
Checked: models, chat (sync, async, streaming, n, seed, stop, logprobs, usage; a second router with
--chat-template renders that template), chat errors as `openai` exceptions with the router's
message, and a client that disconnects mid-stream freeing its worker request.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import requests

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.openai_server import (  # noqa: F401 (fixtures)
    CONTEXT,
    GREEDY,
    MESSAGES,
    MODEL_NAME,
    chat_ids,
    client,
    finish_name,
    native,
    server,
    stop_char,
    templated_client,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

# ---------------------------------------------------------------- models


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    card = models[0].model_dump()
    assert card["object"] == "model" and card["owned_by"] == "pdserve" and card["max_model_len"] == CONTEXT
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist."):
        client.models.retrieve("gpt-4")


# ---------------------------------------------------------------- chat


def test_chat_greedy_equals_native_generate(server, client):
    ids = chat_ids(server)
    ref = native(server, ids, {**GREEDY, "max_new_tokens": 12})
    resp = client.chat.completions.create(model="any-name", messages=MESSAGES, max_tokens=12, **GREEDY)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert choice.finish_reason == finish_name(ref["meta_info"]) and choice.index == 0
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "any-name"
    assert abs(resp.created - time.time()) < 60
    assert resp.usage.prompt_tokens == len(ids) == ref["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert resp.usage.total_tokens == len(ids) + resp.usage.completion_tokens
    # the same prompt again: its pages are in the radix cache now
    assert resp.usage.prompt_tokens_details.cached_tokens > 0
    # max_completion_tokens wins over max_tokens
    short = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=12, max_completion_tokens=3, **GREEDY
    )
    assert short.usage.completion_tokens <= 3 and ref["text"].startswith(short.choices[0].message.content)


def test_chat_template_flag_renders_the_prompt(server, client, templated_client):
    rendered = "[system] You are terse.\n[user] Name three colours.\n[assistant] "
    ids = server["tokenizer"].encode(rendered, add_special_tokens=False)
    assert len(ids) == len(rendered) and ids != chat_ids(server)  # one token per byte, no ChatML
    ref = native(server, ids, {**GREEDY, "max_new_tokens": 6}, return_logprob=True)
    resp = templated_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, logprobs=True, **GREEDY
    )
    assert resp.usage.prompt_tokens == len(ids) == ref["meta_info"]["prompt_tokens"]
    assert resp.choices[0].message.content == ref["text"]
    assert [c.logprob for c in resp.choices[0].logprobs.content] == pytest.approx(
        [e[0] for e in ref["meta_info"]["output_token_logprobs"]], abs=1e-5
    )  # the same tokens, generated from the template's prompt
    # the router without the flag renders the tokenizer's own (ChatML) template
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=1, **GREEDY)
    assert plain.usage.prompt_tokens == len(chat_ids(server)) != len(ids)


def _collect_chat_stream(chunks) -> tuple[dict[int, str], dict[int, str], object, list]:
    contents: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage, order = None, []
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if not chunk.choices:
            usage = chunk.usage
            continue
        c = chunk.choices[0]
        if c.index not in contents:
            assert c.delta.role == "assistant" and c.delta.content == ""  # the role chunk comes first
            contents[c.index] = ""
        else:
            contents[c.index] += c.delta.content or ""
        assert c.index not in reasons, "no chunk of a choice after its finish_reason"
        if c.finish_reason is not None:
            reasons[c.index] = c.finish_reason
        order.append(chunk)
    return contents, reasons, usage, order


def test_chat_streaming_sync_and_async(server, client):
    ref = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, **GREEDY)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    contents, reasons, usage, _ = _collect_chat_stream(stream)
    assert contents == {0: ref.choices[0].message.content}
    assert reasons == {0: ref.choices[0].finish_reason}
    assert usage.prompt_tokens == ref.usage.prompt_tokens
    assert usage.completion_tokens == ref.usage.completion_tokens

    async def run_async() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0) as aclient:
            whole = await aclient.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, max_tokens=10, **GREEDY
            )
            streamed = ""
            async for chunk in await aclient.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY
            ):
                assert chunk.usage is None  # no include_usage: no usage anywhere
                streamed += chunk.choices[0].delta.content or ""
            return whole.choices[0].message.content, streamed

    whole, streamed = asyncio.run(run_async())
    assert whole == streamed == ref.choices[0].message.content


def test_chat_n_seed_and_streamed_n(server, client):
    kwargs = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 7,
        "n": 3,
    }
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # the seed makes sampling repeatable
    assert len(set(texts)) > 1  # ... and each sample has its own seed
    assert first.usage.prompt_tokens == len(chat_ids(server))  # counted once, not n times
    assert first.usage.completion_tokens <= 18

    stream = client.chat.completions.create(
        **{**kwargs, "n": 2}, stream=True, stream_options={"include_usage": True}
    )
    contents, reasons, usage, _ = _collect_chat_stream(stream)
    assert sorted(contents) == [0, 1] and sorted(reasons) == [0, 1]
    assert usage.prompt_tokens == first.usage.prompt_tokens


def test_chat_stop_string(server, client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, **GREEDY)
    text = full.choices[0].message.content
    stop = stop_char(text)
    cut = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=16, stop=[stop], **GREEDY
    )
    choice = cut.choices[0]
    assert choice.message.content == text[: text.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["matched_stop"] == stop


def test_chat_logprobs_equal_native(server, client):
    ids = chat_ids(server)
    ref = native(
        server, ids, {**GREEDY, "max_new_tokens": 5}, return_logprob=True, top_logprobs_num=2,
        return_text_in_logprobs=True,
    )  # fmt: skip
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = resp.choices[0].logprobs.content
    expected = ref["meta_info"]["output_token_logprobs"]
    assert len(content) == len(expected) == ref["meta_info"]["completion_tokens"]
    for got, (logprob, _token_id, text), tops in zip(
        content, expected, ref["meta_info"]["output_top_logprobs"]
    ):
        assert got.logprob == pytest.approx(logprob, abs=1e-5) and got.token == text
        assert got.bytes == list(text.encode())
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([t[0] for t in tops], abs=1e-5)
        assert [t.token for t in got.top_logprobs] == [t[2] for t in tops]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)


# ---------------------------------------------------------------- errors and disconnects


@pytest.mark.parametrize(
    ("call", "words"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"temperature": -1}, "temperature must be in [0, inf)"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"n": 0}, "n must be >= 1"),
        ({"top_logprobs": 3}, "top_logprobs requires logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "JSON schema object"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            'could not be compiled by xgrammar: Unsupported type "bogus"',
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "image_url",
        ),
        ({"max_tokens": 2000}, "maximum context length of 1024 tokens"),
        ({"stream": True, "temperature": -1}, "temperature must be in [0, inf)"),
    ],
)
def test_chat_errors(client, call, words):
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **call}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.status_code == 400 and words in info.value.message, info.value.message


def test_disconnect_mid_stream_aborts_on_the_worker(server):
    url = server["url"]
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=30) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(not line or line.startswith(b"data: {") for line in got)
    deadline = time.monotonic() + 10
    while True:
        load = requests.get(url + "/get_load", timeout=10).json()
        if all(row["num_reqs"] == 0 for row in load):
            break
        assert time.monotonic() < deadline, f"the worker still runs the abandoned request: {load}"
        time.sleep(0.1)
