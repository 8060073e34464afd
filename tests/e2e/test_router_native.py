"""SGLang's native API through the router on a tiny random Llama: real `worker` and `router`
processes on loopback (the SmolLM2 seed flows are in test_router_seeds.py).

One worker, one router with --api-key/--admin-api-key and --preferred-sampling-params: greedy
parity with the in-process Engine, batches, SSE format, n > 1, logprob shapes, 64 concurrent
streams, bad input answered 4xx while a stream in flight finishes untouched, flush_cache while
busy, abort_request (its finish_reason message, the per-worker gauges while it runs), /metrics
deltas, /get_load, PUT /generate, get_model_info's preferred_sampling_params, the API key on
/metrics and before the body-size check, the `/update_weights` alias's admin key; a second router
on the same worker with a --tokenizer-path that adds a BOS, where add_special_tokens changes what
/tokenize answers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import aiohttp
import pytest
import requests

from tests.helpers.router_http import (
    ADMIN,
    ADMIN_KEY,
    API_KEY,
    AUTH,
    assert_error,
    assert_native_stream_grows,
    post,
    sse_chunks,
)
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

TINY_FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PREFERRED = {"max_new_tokens": 5}
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
IM_START, IM_END = 257, 258  # the tiny tokenizer's special tokens (tests/helpers/tiny_models.py)


# ---------------------------------------------------------------------- stacks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))


@pytest.fixture(scope="module")
def tiny_worker(worker_launcher, tiny_model) -> str:
    return worker_launcher("--model-path", tiny_model, *TINY_FLAGS).zmq_address


@pytest.fixture(scope="module")
def tiny(router_launcher, tiny_worker) -> str:
    router = router_launcher(
        "--worker-addr", tiny_worker, "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY,
        "--policy", "round_robin", "--max-batch-size", "70", "--max-body-bytes", "200000",
        "--preferred-sampling-params", json.dumps(PREFERRED),
    )  # fmt: skip
    return router.url


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


def _stream_in_background(url: str, body: dict, result: dict) -> threading.Thread:
    def run() -> None:
        resp = requests.post(url + "/generate", json={**body, "stream": True}, headers=AUTH, timeout=120)
        result["status"] = resp.status_code
        result["chunks"] = sse_chunks(resp)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_bad_input_is_refused_while_a_stream_finishes_untouched(tiny, engine):
    long_params = {"temperature": 0.0, "max_new_tokens": 600, "ignore_eos": True}  # outlasts the checks
    # the engine's first 24 tokens are the reference (all 200 in-process would cost the CI seconds)
    expected = engine.generate([[40, 41, 42]], {**long_params, "max_new_tokens": 24})[0]["output_ids"]
    result: dict = {}
    thread = _stream_in_background(tiny, {"input_ids": [40, 41, 42], "sampling_params": long_params}, result)

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


# ---------------------------------------------------------------------- admin and observability


def test_flush_cache_waits_for_running_requests_with_timeout(tiny):
    result: dict = {}
    params = {"temperature": 0.0, "max_new_tokens": 500, "ignore_eos": True}
    thread = _stream_in_background(tiny, {"input_ids": [1, 2, 3], "sampling_params": params}, result)
    for _ in range(200):  # until the worker runs it
        if requests.get(tiny + "/get_load", headers=AUTH).json()[0]["num_reqs"]:
            break
    refused = requests.post(tiny + "/flush_cache", headers=ADMIN)
    assert_error(refused, 400, "Cache not flushed", "running", "?timeout=")
    waited = requests.post(tiny + "/flush_cache?timeout=60", headers=ADMIN)
    assert waited.status_code == 200, waited.text
    thread.join(60)
    assert result["status"] == 200 and result["chunks"][-2]["meta_info"]["completion_tokens"] == 500
    assert_error(requests.post(tiny + "/flush_cache?timeout=-1", headers=ADMIN), 400, "timeout")


def scrape(url: str, headers=AUTH) -> dict[str, float]:
    """The router's /metrics as {sample name with labels: value}."""
    resp = requests.get(url + "/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    samples = {}
    for line in resp.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_abort_request_ends_the_stream_and_frees_the_worker(tiny, tiny_worker):
    load_gauge = f'pdserve_router_worker_load{{worker="{tiny_worker}"}}'
    inflight_gauge = f'pdserve_router_worker_inflight{{worker="{tiny_worker}"}}'
    requests.get(tiny + "/get_load", headers=AUTH)  # a fresh load report: the last test's request ended
    idle = scrape(tiny)
    assert (idle[load_gauge], idle[inflight_gauge]) == (0, 0)
    result: dict = {}
    params = {"temperature": 0.0, "max_new_tokens": 900, "ignore_eos": True}
    thread = _stream_in_background(
        tiny, {"input_ids": [4, 5], "sampling_params": params, "rid": "stop-me"}, result
    )
    for _ in range(200):
        if requests.get(tiny + "/get_load", headers=AUTH).json()[0]["num_running_reqs"]:
            break
    running = scrape(tiny)  # the per-worker gauges see the request while it runs
    assert (running[load_gauge], running[inflight_gauge]) == (1, 1)
    assert running["pdserve_router_generation_requests_running"] == 1
    assert requests.post(tiny + "/abort_request", json={"rid": "stop-me"}, headers=ADMIN).status_code == 200
    thread.join(60)
    final = result["chunks"][-2]
    assert final["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted by the client."}
    assert final["meta_info"]["completion_tokens"] < 900
    (load,) = requests.get(tiny + "/get_load", headers=AUTH).json()
    assert (load["num_running_reqs"], load["num_waiting_reqs"], load["router_inflight"]) == (0, 0, 0)
    assert load["num_free_pages"] + load["num_evictable_pages"] == load["num_total_pages"]
    after = scrape(tiny)  # /get_load just refreshed the worker's load: the gauges are back to 0
    assert (after[load_gauge], after[inflight_gauge]) == (0, 0)
    assert_error(post(tiny, "/abort_request", {}, headers=ADMIN), 400, "rid")
    assert requests.post(tiny + "/abort_request", json={"abort_all": True}, headers=ADMIN).status_code == 200


def test_metrics_count_requests_tokens_and_workers(tiny):
    before = scrape(tiny)
    post(tiny, "/generate", {"input_ids": [1, 2, 3], "sampling_params": GREEDY})
    post(tiny, "/generate", {"input_ids": []})
    samples = scrape(tiny)
    assert samples['pdserve_router_requests_total{code="200",route="/generate"}'] >= 1
    assert samples['pdserve_router_request_errors_total{code="400",route="/generate"}'] >= 1
    assert samples["pdserve_router_time_to_first_token_seconds_count"] >= 1
    assert samples["pdserve_router_inter_token_latency_seconds_count"] >= 11
    assert samples["pdserve_router_generation_tokens_total"] >= 12
    assert samples["pdserve_router_prompt_tokens_total"] >= 3
    assert 0.0 <= samples["pdserve_router_cache_hit_rate"] <= 1.0
    assert samples["pdserve_router_generation_requests_running"] == 0
    assert any(k.startswith("pdserve_router_worker_up{") and v == 1 for k, v in samples.items())

    def moved(name: str) -> float:
        return samples[name] - before.get(name, 0.0)

    # exactly the one request that generated moved the histograms and counters (the refused one did not)
    e2e = "pdserve_router_e2e_request_latency_seconds"
    assert moved(e2e + "_count") == 1 and moved(e2e + '_bucket{le="+Inf"}') == 1
    assert 0 < moved(e2e + "_sum") < 60
    assert moved("pdserve_router_time_to_first_token_seconds_count") == 1
    assert moved("pdserve_router_generation_tokens_total") == 12
    assert moved("pdserve_router_prompt_tokens_total") == 3
    assert moved('pdserve_router_requests_total{code="200",route="/generate"}') == 1
    assert moved('pdserve_router_request_errors_total{code="400",route="/generate"}') == 1
    # one scrape was counted between the two
    assert moved('pdserve_router_requests_total{code="200",route="/metrics"}') == 1


# ---------------------------------------------------------------------- routes and keys


def test_put_generate_works_like_post(tiny):
    body = {"input_ids": [5, 6, 7], "sampling_params": GREEDY}
    posted = post(tiny, "/generate", body).json()
    put = requests.put(tiny + "/generate", json=body, headers=AUTH, timeout=60)
    assert put.status_code == 200, put.text
    got = put.json()
    assert (got["output_ids"], got["text"]) == (posted["output_ids"], posted["text"])
    assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert got["meta_info"]["prompt_tokens"] == 3
    streamed = sse_chunks(requests.put(tiny + "/generate", json={**body, "stream": True}, headers=AUTH))
    assert_native_stream_grows(streamed[:-1], 12)
    assert streamed[-2]["output_ids"] == posted["output_ids"]
    assert_error(requests.put(tiny + "/generate", json=body), 401, "no API key")


def test_model_info_echoes_preferred_sampling_params(tiny, tiny_model):
    info = requests.get(tiny + "/get_model_info", headers=AUTH).json()
    assert info["preferred_sampling_params"] == PREFERRED == {"max_new_tokens": 5}
    assert info["model_path"] == tiny_model


def test_api_key_guards_metrics_and_comes_before_the_body_size(tiny):
    assert_error(requests.get(tiny + "/metrics"), 401, "/metrics", "no API key")
    assert_error(requests.get(tiny + "/metrics", headers={"Authorization": "Bearer nope"}), 401, "wrong")
    assert "pdserve_router_requests_total" in requests.get(tiny + "/metrics", headers=AUTH).text
    assert requests.get(tiny + "/metrics", headers=ADMIN).status_code == 200  # the admin key works too
    assert requests.get(tiny + "/health").status_code == 200  # the one open route

    big = {"text": "x" * 300_000}  # over --max-body-bytes 200000
    assert_error(requests.post(tiny + "/generate", json=big), 401, "no API key")
    assert_error(post(tiny, "/generate", big, headers={"Authorization": "Bearer nope"}), 401, "wrong")
    assert_error(post(tiny, "/generate", big), 413, "--max-body-bytes")  # with the key: the size check

    def chunked():  # no Content-Length: the size is only known while reading
        yield b'{"text": "'
        yield b"x" * 300_000
        yield b'"}'

    json_type = {"Content-Type": "application/json"}
    assert_error(requests.post(tiny + "/generate", data=chunked(), headers=json_type), 401, "no API key")
    assert_error(
        requests.post(tiny + "/generate", data=chunked(), headers={**json_type, **AUTH}),
        413,
        "--max-body-bytes",
    )


def test_update_weights_alias_takes_the_admin_key(tiny, tiny_model):
    body = {"model_path": tiny_model + "-wrong"}
    assert_error(requests.post(tiny + "/update_weights", json=body), 401, "admin API key", "no API key")
    assert_error(post(tiny, "/update_weights", body, headers=AUTH), 401, "admin API key", "wrong")
    resp = post(tiny, "/update_weights", body, headers=ADMIN)
    assert resp.status_code == 400
    assert resp.json() == {
        "success": False,
        "message": f"Failed to get weights iterator: {tiny_model}-wrong (repository not found).",
        "num_paused_requests": 0,
    }
    assert_error(requests.get(tiny + "/update_weights", headers=ADMIN), 405, "GET")
