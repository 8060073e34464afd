"""Embedding models against Hugging Face transformers on tiny random checkpoints (CPU, float32):
BertModel and XLMRobertaModel (bidirectional, a batch of two prompts in one forward) and the bare
Qwen2Model (whole prompt and in chunks over pages) give HF's last hidden states within 1e-4; the
pooling config is read from sentence-transformers files; embedding models are recognized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.pooling import PoolingConfig, is_embedding_model, pool_hidden
from tests.helpers.tiny_embedding_models import make_tiny_embedding_model

ATOL = 1e-4
PAGE_SIZE = 4


def _batch(model_config: ModelConfig, ids, prefix_lens, extend_lens, tables) -> ForwardBatch:
    c = model_config
    pool = PagedKVPool(
        KVPoolShape(c.num_layers, 32, PAGE_SIZE, c.num_kv_heads, c.head_dim), torch.float32, "cpu"
    )
    return ForwardBatch.build(
        ForwardMode.EXTEND, ids, prefix_lens, extend_lens, tables, PAGE_SIZE, pool, TorchRefAttention()
    )


def _hf_hidden(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_encoder_batch_matches_hf_last_hidden_state(kind: str, tmp_path: Path):
    model_dir = make_tiny_embedding_model(kind, tmp_path)
    config = ModelConfig.from_path(model_dir)
    model = load_model(config, model_dir)
    # xlm-roberta's pad id 1 inside a prompt gets position padding_idx, as in HF
    prompts = [[5, 17, 1, 250, 3, 9, 40], [8, 2, 77]]
    batch = _batch(config, prompts[0] + prompts[1], [0, 0], [7, 3], [[1, 2], [3]])
    with torch.no_grad():
        hidden = model(batch)
    for rows, ids in ((hidden[:7], prompts[0]), (hidden[7:], prompts[1])):
        assert (rows - _hf_hidden(model_dir, ids)).abs().max().item() < ATOL


def test_encoder_refuses_a_cached_prefix(tmp_path: Path):
    model_dir = make_tiny_embedding_model("bert", tmp_path)
    config = ModelConfig.from_path(model_dir)
    model = load_model(config, model_dir)
    with pytest.raises(ValueError, match="whole prompts"):
        model(_batch(config, [4, 5], [2], [2], [[1]]))


def test_bare_qwen2_whole_and_chunked_match_hf(tmp_path: Path):
    model_dir = make_tiny_embedding_model("qwen2", tmp_path)
    config = ModelConfig.from_path(model_dir)
    model = load_model(config, model_dir)
    ids = [7, 100, 3, 45, 9, 200, 31, 8, 66, 12, 5]
    ref = _hf_hidden(model_dir, ids)
    with torch.no_grad():
        whole = model(_batch(config, ids, [0], [len(ids)], [[4, 2, 9]]))
        assert (whole - ref).abs().max().item() < ATOL
        pool_batch = _batch(config, ids[:6], [0], [6], [[4, 2, 9]])
        first = model(pool_batch)
        rest_batch = ForwardBatch.build(
            ForwardMode.EXTEND,
            ids[6:],
            [6],
            [5],
            [[4, 2, 9]],
            PAGE_SIZE,
            pool_batch.kv_pool,
            TorchRefAttention(),
        )
        rest = model(rest_batch)
    assert (torch.cat([first, rest]) - ref).abs().max().item() < ATOL
    got = pool_hidden(rest, "last", normalize=True)
    want = torch.nn.functional.normalize(ref[-1], dim=0)
    assert torch.cosine_similarity(got, want, dim=0).item() >= 0.9999


def test_pooling_config_from_sentence_transformers_files(tmp_path: Path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert PoolingConfig.for_model(tmp_path, ["BertModel"]) == PoolingConfig("mean", True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        PoolingConfig.for_model(tmp_path, ["BertModel"])
    empty = tmp_path / "plain"
    empty.mkdir()
    assert PoolingConfig.for_model(empty, ["BertModel"]) == PoolingConfig("cls", True)
    assert PoolingConfig.for_model(empty, ["Qwen2ForCausalLM"]) == PoolingConfig("last", True)


def test_which_models_are_embedding_models(tmp_path: Path):
    assert is_embedding_model(tmp_path, ["BertModel"], flag=False)
    assert is_embedding_model(tmp_path, ["Qwen2Model"], flag=False)
    assert not is_embedding_model(tmp_path, ["Qwen2ForCausalLM"], flag=False)
    assert is_embedding_model(tmp_path, ["Qwen2ForCausalLM"], flag=True)
    (tmp_path / "modules.json").write_text("[]")
    assert is_embedding_model(tmp_path, ["Qwen2ForCausalLM"], flag=False)


def test_pool_methods():
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    assert pool_hidden(h, "cls", False).tolist() == [3.0, 4.0]
    assert pool_hidden(h, "last", False).tolist() == [0.0, 2.0]
    assert torch.allclose(pool_hidden(h, "mean", False), torch.tensor([4 / 3, 2.0]))
    assert torch.allclose(pool_hidden(h, "cls", True), torch.tensor([0.6, 0.8]))
