"""SGLang's native generation through the router on a tiny random Llama: real `worker` and `router`
processes on loopback (tests/helpers/router_native_stack.py; the SmolLM2 seed flows are in
test_router_seeds.py).

Greedy parity with the in-process Engine, batches, SSE format, n > 1, logprob shapes, 64 concurrent
streams, bad input answered 4xx while a stream in flight finishes untouched; a second router on the
same worker with a --tokenizer-path that adds a BOS, where add_special_tokens changes what /tokenize
answers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import pytest
import requests

from tests.helpers.router_http import (
    ADMIN,
    AUTH,
    assert_error,
    assert_native_stream_grows,
    post,
    sse_chunks,
)

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.router_native_stack import (  # noqa: F401 (fixtures)
    GREEDY,
    stream_in_background,
    tiny,
    tiny_model,
    tiny_worker,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

IM_START, IM_END = 257, 258  # the tiny tokenizer's special tokens (tests/helpers/tiny_models.py)


# ---------------------------------------------------------------------- stacks


@pytest.fixture(scope="module")
def bos_router(router_launcher, tiny_worker, tiny_model, tmp_path_factory) -> str:
    """A router on the tiny worker whose --tokenizer-path adds a BOS (<|im_start|>) to every text,
    as Llama's tokenizers do: there add_special_tokens changes what /tokenize answers."""
    from tokenizers import Tokenizer, processors

    bos_dir = tmp_path_factory.mktemp("bos-tokenizer")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tiny_model) / name, bos_dir / name)
    backend = Tokenizer.from_file(str(bos_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", IM_START)]
    )
    backend.save(str(bos_dir / "tokenizer.json"))
    return router_launcher("--worker-addr", tiny_worker, "--tokenizer-path", str(bos_dir)).url


@pytest.fixture(scope="module")
def engine(tiny_model):
    from pdserve.shared.args import EngineArgs
    from pdserve.shared.engine.engine import Engine

    return Engine(EngineArgs(model_path=tiny_model, device="cpu", dtype="float32", max_total_tokens=4096))


# ---------------------------------------------------------------------- generation (tiny model)


def test_greedy_outputs_equal_engine_generate(tiny, engine, tiny_model):
    prompts = [[5, 6, 7], list(range(40, 70)), [300]]
    expected = engine.generate(prompts, GREEDY)
    single = post(tiny, "/generate", {"input_ids": prompts[0], "sampling_params": GREEDY}).json()
    assert single["output_ids"] == expected[0]["output_ids"]
    assert single["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert single["meta_info"]["completion_tokens"] == 12 and single["meta_info"]["prompt_tokens"] == 3
    batch = post(tiny, "/generate", {"input_ids": prompts, "sampling_params": GREEDY}).json()
    assert [b["output_ids"] for b in batch] == [e["output_ids"] for e in expected]
    assert len({b["meta_info"]["id"] for b in batch}) == 3
    # text prompts are tokenized by the router; text is the decode of the output ids
    from pdserve.shared.tokenizer import get_tokenizer

    tok = get_tokenizer(tiny_model)
    texts = ["hello", "tiny model"]
    out = post(tiny, "/generate", {"text": texts, "sampling_params": GREEDY, "rid": ["r-a", "r-b"]}).json()
    ref = engine.generate([tok.encode(t) for t in texts], GREEDY)
    for o, r in zip(out, ref):
        assert o["output_ids"] == r["output_ids"]
        assert o["text"] == tok.decode(r["output_ids"], skip_special_tokens=True)
    assert [o["meta_info"]["id"] for o in out] == ["r-a", "r-b"]
    # --preferred-sampling-params are the defaults: max_new_tokens 5 unless the request says
    default = post(tiny, "/generate", {"input_ids": [5, 6], "sampling_params": {"ignore_eos": True}}).json()
    assert default["meta_info"]["completion_tokens"] == 5


def test_add_special_tokens_with_a_bos_tokenizer(bos_router):
    # byte-level ids: "hi" is [104, 105]; this tokenizer prepends <|im_start|> (257) unless told not to
    def tokenize(body: dict) -> dict:
        return requests.post(bos_router + "/tokenize", json=body).json()

    assert tokenize({"prompt": "hi"}) == {"tokens": [IM_START, 104, 105], "count": 3, "max_model_len": 1024}
    assert tokenize({"prompt": "hi", "add_special_tokens": True})["tokens"] == [IM_START, 104, 105]
    assert tokenize({"prompt": "hi", "add_special_tokens": False})["tokens"] == [104, 105]
    batch = tokenize({"prompt": ["hi", "a"], "add_special_tokens": False})
    assert batch["tokens"] == [[104, 105], [97]] and batch["count"] == [2, 1]
    assert tokenize({"prompt": ["hi", "a"]})["tokens"] == [[IM_START, 104, 105], [IM_START, 97]]
    for skip, expected in ((True, "hi"), (False, "<|im_start|>hi<|im_end|>")):
        body = {"tokens": [IM_START, 104, 105, IM_END], "skip_special_tokens": skip}
        assert requests.post(bos_router + "/v1/detokenize", json=body).json()["text"] == expected
    # /generate encodes a text prompt with special tokens, as SGLang does: the BOS is a prompt token
    out = requests.post(
        bos_router + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}}, timeout=60
    ).json()
    assert out["meta_info"]["prompt_tokens"] == 3


def test_streaming_sse_format(tiny):
    body = {"input_ids": [9, 8, 7], "sampling_params": GREEDY, "stream": True}
    resp = post(tiny, "/generate", body)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    chunks = sse_chunks(resp)
    events = chunks[:-1]
    assert_native_stream_grows(events, 12)
    assert all("index" not in e for e in events)
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert "e2e_latency" in events[-1]["meta_info"]
    final = post(tiny, "/generate", {**body, "stream": False}).json()
    assert events[-1]["output_ids"] == final["output_ids"] and events[-1]["text"] == final["text"]
    # a batch stream carries the index of each chunk's sample
    batch = sse_chunks(post(tiny, "/generate", {**body, "input_ids": [[1, 2], [3, 4]]}))[:-1]
    assert {c["index"] for c in batch} == {0, 1}
    for i in (0, 1):
        assert_native_stream_grows([c for c in batch if c["index"] == i], 12)


def test_n_samples(tiny):
    params = {"temperature": 1.0, "max_new_tokens": 6, "n": 3, "sampling_seed": 7, "ignore_eos": True}
    out = post(tiny, "/generate", {"input_ids": [10, 11, 12], "sampling_params": params, "rid": "nn"}).json()
    assert isinstance(out, list) and len(out) == 3
    assert [o["meta_info"]["id"] for o in out] == ["nn-0", "nn-1", "nn-2"]
    assert all(len(o["output_ids"]) == 6 for o in out)
    assert len({tuple(o["output_ids"]) for o in out}) > 1  # samples differ
    again = post(tiny, "/generate", {"input_ids": [10, 11, 12], "sampling_params": params}).json()
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in out]  # seeded
    batch = post(tiny, "/generate", {"input_ids": [[1], [2]], "sampling_params": {**params, "n": 2}}).json()
    assert len(batch) == 4 and batch[0]["meta_info"]["id"][:-2] == batch[1]["meta_info"]["id"][:-2]


def test_logprob_shapes(tiny, engine):
    body = {
        "input_ids": [20, 21, 22, 23],
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 5, "ignore_eos": True},
        "return_logprob": True,
        "top_logprobs_num": 3,
        "logprob_start_len": 0,
        "token_ids_logprob": [1, 2],
        "return_text_in_logprobs": True,
    }
    meta = post(tiny, "/generate", body).json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 5 and len(meta["input_token_logprobs"]) == 4
    assert meta["input_token_logprobs"][0][0] is None and meta["input_token_logprobs"][0][1] == 20
    for logprob, token_id, text in meta["output_token_logprobs"]:
        assert logprob <= 0 and isinstance(token_id, int) and isinstance(text, str)
    assert len(meta["output_top_logprobs"]) == 5 and all(len(t) == 3 for t in meta["output_top_logprobs"])
    assert all(len(t) == 2 and [e[1] for e in t] == [1, 2] for t in meta["output_token_ids_logprobs"])
    ref = engine.generate([[20, 21, 22, 23]], body["sampling_params"], return_logprob=True)[0]
    ours = [e[0] for e in meta["output_token_logprobs"]]
    theirs = [e[0] for e in ref["meta_info"]["output_token_logprobs"]]
    assert ours == pytest.approx(theirs, abs=1e-4)
    plain = post(tiny, "/generate", {**body, "return_text_in_logprobs": False}).json()["meta_info"]
    assert all(e[2] is None for e in plain["output_token_logprobs"])
    # streamed logprob lists are cumulative, like the text
    chunks = sse_chunks(post(tiny, "/generate", {**body, "stream": True}))[:-1]
    assert_native_stream_grows(chunks, 5)
    assert all(len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"]) for c in chunks)


def test_64_concurrent_streams_complete_with_the_right_text(tiny, engine):
    prompts = [[(7 * i + j) % 250 + 3 for j in range(3 + i % 9)] for i in range(64)]
    params = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
    expected = [r["output_ids"] for r in engine.generate(prompts, params)]

    async def one(session: aiohttp.ClientSession, ids: list[int]) -> list[int]:
        body = {"input_ids": ids, "sampling_params": params, "stream": True}
        last = None
        async with session.post(f"{tiny}/generate", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            async for line in resp.content:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    last = json.loads(line[6:])
        assert last is not None and last["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
        return last["output_ids"]

    async def run_all() -> list[list[int]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await asyncio.gather(*(one(session, p) for p in prompts))

    assert asyncio.run(run_all()) == expected


# ---------------------------------------------------------------------- bad input


def test_bad_input_is_refused_while_a_stream_finishes_untouched(tiny, engine):
    long_params = {"temperature": 0.0, "max_new_tokens": 600, "ignore_eos": True}  # outlasts the checks
    # the engine's first 24 tokens are the reference (all 200 in-process would cost the CI seconds)
    expected = engine.generate([[40, 41, 42]], {**long_params, "max_new_tokens": 24})[0]["output_ids"]
    result: dict = {}
    thread = stream_in_background(tiny, {"input_ids": [40, 41, 42], "sampling_params": long_params}, result)

    gen = tiny + "/generate"
    bad = requests.post(gen, data=b'{"text": "unterminated', headers=AUTH)
    assert_error(bad, 400, "Malformed JSON")
    assert_error(requests.post(gen, data=b"", headers=AUTH), 400, "empty")
    assert_error(post(tiny, "/generate", [1, 2]), 400, "JSON object")
    assert_error(post(tiny, "/generate", {"text": 5}), 400, "text")
    assert_error(post(tiny, "/generate", {"text": "a", "input_ids": [1]}), 400, "Either text or input_ids")
    assert_error(post(tiny, "/generate", {"text": "a", "stream": "yes"}), 400, "stream")
    assert_error(post(tiny, "/generate", {"input_ids": [1, "x"]}), 400, "input_ids")
    assert_error(
        post(tiny, "/generate", {"text": "a", "sampling_params": {"temperature": -1}}), 400, "temperature"
    )
    assert_error(post(tiny, "/generate", {"text": "a", "sampling_params": {"top_p": 2}}), 400, "top_p")
    assert_error(post(tiny, "/generate", {"text": "a", "sampling_params": {"n": 0}}), 400, "n must be")
    assert_error(
        post(tiny, "/generate", {"text": "a", "sampling_params": {"temprature": 1}}), 400, "temprature"
    )
    assert_error(post(tiny, "/generate", {"text": "a", "sampling_params": "greedy"}), 400, "sampling_params")
    assert_error(post(tiny, "/generate", {"text": "a", "image_data": "x.png"}), 400, "image")
    assert_error(post(tiny, "/generate", {"text": ""}), 400, "input_ids")
    assert_error(post(tiny, "/generate", {"input_ids": [600]}), 400, "[0, 512)")
    assert_error(post(tiny, "/generate", {"input_ids": [1] * 1100}), 400, "1100 tokens", "1024 tokens")
    long_ask = {"input_ids": [1] * 1000, "sampling_params": {"max_new_tokens": 100}}
    assert_error(post(tiny, "/generate", long_ask), 400, "1024 tokens", "1000 tokens from the input")
    assert_error(post(tiny, "/generate", {"input_ids": [[1]] * 71}), 400, "--max-batch-size 70")
    assert_error(post(tiny, "/generate", {"text": "x" * 300_000}), 413, "--max-body-bytes")
    assert_error(post(tiny, "/generate", {"text": "a"}, headers={}), 401, "no API key")
    assert_error(
        post(tiny, "/generate", {"text": "a"}, headers={"Authorization": "Bearer nope"}), 401, "wrong"
    )
    assert_error(post(tiny, "/flush_cache", None, headers=AUTH), 401, "admin API key")
    assert_error(requests.get(tiny + "/nowhere", headers=AUTH), 404, "/nowhere")
    assert_error(requests.get(gen, headers=AUTH), 405, "GET")
    assert post(tiny, "/generate", {"input_ids": [1, 2]}, headers=ADMIN).status_code == 200  # admin key works
    assert requests.get(tiny + "/health").status_code == 200  # open

    thread.join(120)
    assert result["status"] == 200
    final = result["chunks"][-2]
    assert final["output_ids"][:24] == expected and len(final["output_ids"]) == 600
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 600}
    assert_native_stream_grows(result["chunks"][:-1], 600)
