"""OpenAI completions through a real router and a real worker, driven by the official `openai` client.

One `worker --role mixed` (tiny random Llama, CPU, float32) behind one `router --worker-addr`
(tests/helpers/openai_server.py). The native `/generate` of the same router is the oracle: greedy
outputs, token counts and logprobs of a completion must equal those of the native request for the
same token ids. Checked: every prompt form, n, echo, stop, logprobs, frequency/presence penalties,
top_k, min_p, streaming, and errors as `openai` exceptions with the router's message.
"""

from __future__ import annotations

import openai
import pytest
import requests

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.openai_server import (  # noqa: F401 (fixtures)
    GREEDY,
    MODEL_NAME,
    client,
    native,
    server,
    stop_char,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

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
    # both measured requests find the prompts cached (usage's cached_tokens), whatever ran before
    client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=1, **GREEDY)
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


def test_completion_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="1020 tokens from the input and 10 tokens"):
        client.completions.create(model=MODEL_NAME, prompt=[65] * 1020, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        client.completions.create(model=MODEL_NAME, prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model=MODEL_NAME, prompt="x", extra_body={"regex": "a("})
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
