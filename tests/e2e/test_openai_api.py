"""The OpenAI API through a real router and a real worker, driven by the official `openai` client.

One `worker --role mixed` (tiny random Llama, CPU, float32) behind one `router --worker-addr`.
The native `/generate` of the same router is the oracle: greedy outputs, token counts and logprobs
of an OpenAI request must equal those of the native request for the same token ids (the chat
prompt is the tokenizer's chat template, rendered here independently). Checked: models,
completions (every prompt form, n, echo, stop, logprobs, frequency/presence penalties, top_k,
min_p), chat (sync, async, streaming, n, seed, stop, logprobs, usage; a second router with
--chat-template renders that template), errors as `openai` exceptions with the router's message,
and a client that disconnects mid-stream freeing its worker request.
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


# ---------------------------------------------------------------- completions


def test_completion_prompt_forms_and_n(server, client):
    tok = server["tokenizer"]
    prompts = ["Once upon a time", "The capital of France is"]
    ids = [tok.encode(p) for p in prompts]
    natives = [native(server, i, {**GREEDY, "max_new_tokens": 6}) for i in ids]
    refs = [r["text"] for r in natives]
    ref_tokens = [r["meta_info"]["completion_tokens"] for r in natives]

    one = client.completions.create(model=MODEL_NAME, prompt=prompts[0], max_tokens=6, **GREEDY)
    assert one.object == "text_completion" and one.id.startswith("cmpl-") and one.model == MODEL_NAME
    assert one.choices[0].text == refs[0] and one.usage.prompt_tokens == len(ids[0])
    assert (
        client.completions.create(model=MODEL_NAME, prompt=ids[0], max_tokens=6, **GREEDY).choices[0].text
        == refs[0]
    )

    for prompt in (prompts, ids):
        batch = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, n=2, **GREEDY)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert [c.text for c in batch.choices] == [refs[0], refs[0], refs[1], refs[1]]
        assert batch.usage.prompt_tokens == len(ids[0]) + len(ids[1])
        assert batch.usage.completion_tokens == 2 * sum(ref_tokens)
        assert batch.usage.total_tokens == batch.usage.prompt_tokens + batch.usage.completion_tokens

    # max_tokens defaults to 16, like OpenAI
    default = client.completions.create(model=MODEL_NAME, prompt=prompts[0], extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"


def test_completion_penalties_top_k_and_min_p_reach_the_sampler(server, client):
    ids = server["tokenizer"].encode("Once upon a time")
    n = 16

    def run_native(params: dict) -> dict:
        return native(server, ids, {"max_new_tokens": n, "ignore_eos": True, **params}, return_logprob=True)

    def native_logprobs(out: dict) -> list[float]:
        return [e[0] for e in out["meta_info"]["output_token_logprobs"]]

    def completion(**kwargs) -> tuple[list[float], str]:
        extra = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
        resp = client.completions.create(
            model=MODEL_NAME, prompt=ids, max_tokens=n, logprobs=0, extra_body=extra, **kwargs
        )
        assert resp.usage.completion_tokens == n
        return resp.choices[0].logprobs.token_logprobs, resp.choices[0].text

    # the logprobs of the chosen tokens (of the raw logits) tell two token sequences apart
    greedy = run_native({"temperature": 0.0})
    # penalties act on greedy rows too: each changes this repetitive output, and differently
    penalized = {}
    for name in ("frequency_penalty", "presence_penalty"):
        ref = run_native({"temperature": 0.0, name: 0.2})
        logprobs, text = completion(temperature=0.0, **{name: 0.2})
        assert logprobs == pytest.approx(native_logprobs(ref), abs=1e-5) and text == ref["text"]
        penalized[name] = ref["output_ids"]
    assert greedy["output_ids"] != penalized["frequency_penalty"] != penalized["presence_penalty"]
    assert penalized["presence_penalty"] != greedy["output_ids"]

    # hot sampling with a seed (OpenAI's seed is SGLang's sampling_seed) strays from greedy ...
    hot = {"temperature": 2.0, "seed": 3}
    free, _ = completion(**hot)
    assert free == pytest.approx(
        native_logprobs(run_native({"temperature": 2.0, "sampling_seed": 3})), abs=1e-5
    )
    assert free != pytest.approx(native_logprobs(greedy), abs=1e-5)
    # ... unless only the top token survives: top_k=1, or min_p=1 (only the max probability passes)
    for only_top in ({"top_k": 1}, {"min_p": 1.0}):
        kept, _ = completion(extra_body=only_top, **hot)
        assert kept == pytest.approx(native_logprobs(greedy), abs=1e-5), only_top
    # and partial filters match the native route's, and differ from unfiltered sampling
    for partial in ({"top_k": 2}, {"min_p": 0.3}):
        ref = run_native({"temperature": 2.0, "sampling_seed": 3, **partial})
        got, _ = completion(extra_body=partial, **hot)
        assert got == pytest.approx(native_logprobs(ref), abs=1e-5), partial
        assert got != pytest.approx(free, abs=1e-5), partial


def test_completion_streaming_batch(server, client):
    prompts = ["Once upon a time", "The capital of France is"]
    whole = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=8, **GREEDY)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(
        model=MODEL_NAME,
        prompt=prompts,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    ):
        if not chunk.choices:
            usage = chunk.usage
            continue
        c = chunk.choices[0]
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()


def test_completion_stop_and_stop_token_ids(server, client):
    tok = server["tokenizer"]
    prompt = "Once upon a time"
    ref = native(server, tok.encode(prompt), {**GREEDY, "max_new_tokens": 16, "ignore_eos": True})
    stop = stop_char(ref["text"])
    cut = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=16, stop=stop, extra_body={"ignore_eos": True}, **GREEDY
    )
    assert cut.choices[0].text == ref["text"][: ref["text"].index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["matched_stop"] == stop

    stop_id = ref["output_ids"][3]
    by_id = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=16,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]},
        **GREEDY,
    )
    k = ref["output_ids"].index(stop_id)
    assert by_id.usage.completion_tokens == k + 1
    assert (
        by_id.choices[0].finish_reason == "stop" and by_id.choices[0].model_extra["matched_stop"] == stop_id
    )


def test_completion_logprobs_equal_native(server, client):
    ids = server["tokenizer"].encode("The capital of France is")
    ref = native(
        server, ids, {**GREEDY, "max_new_tokens": 5}, return_logprob=True, top_logprobs_num=3,
        return_text_in_logprobs=True,
    )["meta_info"]  # fmt: skip
    resp = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, logprobs=3, **GREEDY)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e[0] for e in ref["output_token_logprobs"]], abs=1e-5)
    assert lp.tokens == [e[2] for e in ref["output_token_logprobs"]]
    for got, tops in zip(lp.top_logprobs, ref["output_top_logprobs"]):
        expected = {}
        for logprob, _id, text in tops:
            expected.setdefault(text, logprob)  # two ids with one text: the dict keeps one
        assert set(got) == set(expected)
        assert len(got) <= 3
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets


def test_completion_echo(server, client):
    tok = server["tokenizer"]
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    ref = native(server, ids, {**GREEDY, "max_new_tokens": 3}, return_logprob=True, logprob_start_len=0,
                 return_text_in_logprobs=True)  # fmt: skip
    resp = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=1, **GREEDY
    )
    choice = resp.choices[0]
    assert choice.text == prompt + ref["text"]
    lp = choice.logprobs
    n_prompt = len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [
        e[0] for e in ref["meta_info"]["input_token_logprobs"] + ref["meta_info"]["output_token_logprobs"]
    ]
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-5)
    assert len(lp.tokens) == n_prompt + 3 and lp.text_offset[n_prompt] == len(prompt)

    # scoring a prompt (max_tokens 0, echo, logprobs): the prompt comes back with its logprobs
    score = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert score.choices[0].text == prompt and score.usage.completion_tokens == 0
    assert score.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[1:n_prompt], abs=1e-5)

    first = next(iter(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, echo=True,
                                                stream=True, **GREEDY)))  # fmt: skip
    assert first.choices[0].text.startswith(prompt)


# ---------------------------------------------------------------- errors and disconnects


@pytest.mark.parametrize(
    ("call", "words"),
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"temperature": -1}, "temperature must be in [0, inf)"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"n": 0}, "n must be >= 1"),
        ({"top_logprobs": 3}, "top_logprobs requires logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "not supported yet"),
        ({"response_format": {"type": "json_object"}}, "not supported yet"),
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


def test_completion_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="1020 tokens from the input and 10 tokens"):
        client.completions.create(model=MODEL_NAME, prompt=[65] * 1020, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        client.completions.create(model=MODEL_NAME, prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model=MODEL_NAME, prompt="x", extra_body={"regex": "a+"})
    with pytest.raises(
        openai.BadRequestError, match="input_ids must hold token ids in"
    ):  # the worker's check
        client.completions.create(model=MODEL_NAME, prompt=[100000], max_tokens=2)
    url = server["url"]
    resp = requests.post(url + "/v1/completions", data=b"{not json", timeout=10)
    body = resp.json()
    assert resp.status_code == 400 and body["object"] == "error" and body["code"] == 400
    assert body["type"] == "BadRequestError" and "Malformed JSON" in body["message"]
    resp = requests.post(url + "/v1/chat/completions", json={"model": MODEL_NAME}, timeout=10)
    assert resp.status_code == 400 and resp.json()["message"] == "messages is required."
    assert resp.json()["param"] == "messages"


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
