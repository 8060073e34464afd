"""Reward models and cross-encoders through the engine's embedding path against transformers'
`*ForSequenceClassification` (tiny random checkpoints, CPU, float32): the scores of every prompt
equal HF's logits within 1e-4 (through a sigmoid for a single-label cross-encoder, as
sentence-transformers' CrossEncoder gives them); BERT pairs get their token types from the [SEP]
that ends the prompt; the engine reports the labels and that it does not generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.offline import embed_offline
from tests.helpers.tiny_classifiers import make_tiny_classifier

ATOL = 1e-4
# (kind, labels, prompts): BERT [CLS]=2 [SEP]=3; XLM-R <s>=0 </s>=2; decoders any ids
CASES = [
    ("bert", 1, [[2, 10, 11, 3, 20, 21, 22, 3], [2, 40, 41, 3], [2, 50, 3, 60, 61, 62, 63, 3]]),
    ("bert", 3, [[2, 10, 11, 3, 20, 21, 22, 3], [2, 40, 41, 42, 3]]),
    ("xlm-roberta", 1, [[0, 10, 11, 2, 2, 20, 21, 2], [0, 40, 41, 2]]),
    ("llama", 1, [[5, 17, 29, 41, 53, 65, 77], [8, 9]]),
    ("qwen2", 3, [[5, 17, 29, 41, 53, 65, 77, 89, 101, 113, 125], [30]]),
]


def _token_types(ids: list[int]) -> list[int]:
    first_sep = ids.index(ids[-1])
    return [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


@torch.no_grad()
def _hf_scores(model_dir: Path, kind: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        kwargs = {"token_type_ids": torch.tensor([_token_types(ids)])} if kind == "bert" else {}
        logits = hf(input_ids=torch.tensor([ids]), **kwargs).logits[0].float()
        cross_encoder = kind in ("bert", "xlm-roberta")
        out.append(torch.sigmoid(logits) if cross_encoder and logits.numel() == 1 else logits)
    return out


@pytest.mark.parametrize(("kind", "labels", "prompts"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_scores_match_transformers(kind: str, labels: int, prompts: list[list[int]], tmp_path: Path):
    model_dir = make_tiny_classifier(kind, tmp_path, num_labels=labels)
    engine = Engine(EngineArgs(model_path=str(model_dir), device="cpu", max_total_tokens=2048))
    info = engine.server_info()
    assert not info.is_generation and info.labels == [f"class_{i}" for i in range(labels)]
    expected = _hf_scores(model_dir, kind, prompts)
    answers = embed_offline(engine, prompts)  # one batch
    one_by_one = [embed_offline(engine, [p])[0] for p in prompts]
    for got, alone, ref in zip(answers, one_by_one, expected):
        assert got.error is None and len(got.embedding) == labels
        assert (torch.tensor(got.embedding) - ref).abs().max().item() < ATOL, (got.embedding, ref)
        assert (torch.tensor(alone.embedding) - ref).abs().max().item() < ATOL
    assert ref.abs().max().item() > 1e-3  # a score that says something
