"""SGLang's `/v1/score` end to end (router + mixed worker, tiny random Llama with its byte-level
tokenizer): each item's label-token probabilities after query + item equal transformers' next-token
distribution (exp of log_softmax, or the softmax over the labels alone with apply_softmax), for
text items, token-id items and item_first; bad bodies are 400s naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from tests.helpers.router_http import assert_error
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

LABELS = [ord("y"), ord("n"), ord(" ")]


@pytest.fixture(scope="module")
def served(tmp_path_factory, worker_launcher, router_launcher) -> tuple[str, Path]:
    model_dir = make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama")))
    worker = worker_launcher("--model-path", str(model_dir), "--dtype", "float32", "--device", "cpu")
    return router_launcher("--worker-addr", worker.zmq_address).url, model_dir


@torch.no_grad()
def _next_token_logprobs(model_dir: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return [torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].float(), dim=-1)[LABELS] for p in prompts]


def _close(got: list[list[float]], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for row, ref in zip(got, want):
        assert (torch.tensor(row) - ref).abs().max().item() < 1e-4, (row, ref)


def test_scores_match_transformers(served):
    url, model_dir = served
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    query, items = "Is the sky blue? Answer:", [" yes", " no", " maybe so"]
    prompts = [tokenizer(query + item)["input_ids"] for item in items]
    logprobs = _next_token_logprobs(model_dir, prompts)
    body = {"model": "m", "query": query, "items": items, "label_token_ids": LABELS}
    resp = requests.post(url + "/v1/score", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "scoring" and out["model"] == "m"
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    _close(out["scores"], [lp.exp() for lp in logprobs])
    soft = requests.post(url + "/v1/score", json={**body, "apply_softmax": True}, timeout=60).json()
    _close(soft["scores"], [torch.softmax(lp, dim=0) for lp in logprobs])
    # token ids, the item first
    q_ids, item_ids = [70, 71, 72], [[80, 81], [90]]
    by_ids = requests.post(
        url + "/v1/score",
        json={"query": q_ids, "items": item_ids, "label_token_ids": LABELS, "item_first": True},
        timeout=60,
    ).json()
    _close(
        by_ids["scores"], [lp.exp() for lp in _next_token_logprobs(model_dir, [i + q_ids for i in item_ids])]
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"query": "q", "items": ["a"]}, ["label_token_ids"]),
        ({"query": "q", "items": ["a"], "label_token_ids": [1, 999999]}, ["label_token_ids"]),
        ({"query": "q", "items": [], "label_token_ids": [1]}, ["items must be"]),
        ({"query": [1, 2], "items": ["a"], "label_token_ids": [1]}, ["query must be"]),
        ({"query": "q", "items": [[1, 2]], "label_token_ids": [1]}, ["query must be"]),
        ({"query": "q", "items": ["a"], "label_token_ids": [1], "apply_softmax": "yes"}, ["apply_softmax"]),
    ],
)
def test_bad_bodies_are_400s(served, body, words):
    assert_error(requests.post(served[0] + "/v1/score", json=body, timeout=30), 400, *words)
