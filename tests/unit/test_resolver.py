"""Model resolution (local, packaged SmolLM2, hub cache), the convert-once cache, ModelConfig, tokenizer.

No network and no real conversion here: the SmolLM2 converter is replaced by a fake one (the real
conversion runs in tests/e2e/test_smollm2_weights.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from pdserve.shared.models import resolver
from pdserve.shared.models.config import ModelConfig, resolve_dtype
from pdserve.shared.models.convert_cache import MARKER, convert_once
from pdserve.shared.models.resolver import ModelNotFoundError, resolve_model
from pdserve.shared.tokenizer import get_tokenizer
from tests.helpers.tiny_models import make_tiny_model


def _write_config(d: Path, **extra) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "eos_token_id": 2,
        **extra,
    }
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_local_directory_resolves_to_itself(tmp_path: Path):
    d = _write_config(tmp_path / "m")
    r = resolve_model(str(d))
    assert r.local_dir == d.resolve() and r.reported_path == str(d)


@pytest.mark.parametrize("path", ["/nonexistent/pdserve-model", "./no/such/dir", "no-slash-name"])
def test_missing_local_path_is_not_found(path: str):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(path)
    assert str(e.value) == f"{path} (repository not found)"
    assert isinstance(e.value, FileNotFoundError)


def test_directory_without_config_is_not_found(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match=r"\(repository not found\)$"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_is_not_found(monkeypatch, tmp_path: Path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # never wait on a network here
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("pdserve-test-org/no-such-model")
    assert str(e.value) == "pdserve-test-org/no-such-model (repository not found)"


def test_hub_id_found_in_local_hf_cache(monkeypatch, tmp_path: Path):
    import huggingface_hub.constants as hub_constants

    commit = "a" * 40
    repo = tmp_path / "models--some-org--tiny"
    _write_config(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    r = resolve_model("some-org/tiny")
    assert r.local_dir == repo / "snapshots" / commit and r.reported_path == "some-org/tiny"


def test_smollm2_id_converts_once_into_cache_dir(monkeypatch, tmp_path: Path):
    calls: list[Path] = []

    def fake_convert(out: Path) -> None:
        calls.append(out)
        _write_config(out)

    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(resolver, "convert_smollm2", fake_convert)
    first = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    second = resolve_model("huggingfacetb/smollm2-135m-instruct")
    target = tmp_path / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert first.local_dir == second.local_dir == target
    assert first.reported_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != target  # built beside, renamed
    assert (target / "config.json").is_file() and (target / MARKER).is_file()


def test_convert_once_under_concurrency(tmp_path: Path):
    calls = []

    def slow_convert(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "data").write_text("x")

    target = tmp_path / "model"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(convert_once(target, 1, slow_convert)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]  # no temp dirs left


def test_convert_once_replaces_stale_and_cleans_up_failures(tmp_path: Path):
    target = tmp_path / "model"
    convert_once(target, 1, lambda out: (out / "v").write_text("1"))
    convert_once(target, 2, lambda out: (out / "v").write_text("2"))
    assert (target / "v").read_text() == "2"

    def broken(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        convert_once(target, 3, broken)
    assert (target / "v").read_text() == "2"  # the old directory is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]


def test_model_config_fields(tmp_path: Path):
    d = _write_config(
        tmp_path / "m",
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        dtype="bfloat16",
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    c = ModelConfig.from_path(d)
    assert (c.num_layers, c.num_attention_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 32)
    assert c.architecture == "LlamaForCausalLM" and c.context_length == 512 and c.vocab_size == 100
    assert c.dtype == torch.float32  # auto on CPU
    assert c.eos_token_ids == frozenset({2, 7}) and c.tie_word_embeddings and c.rope.theta == 500000.0
    c = ModelConfig.from_path(d, dtype="auto", device="cuda", context_length=128)
    assert c.dtype == torch.bfloat16 and c.context_length == 128


def test_model_config_without_generation_config_and_head_dim(tmp_path: Path):
    d = _write_config(tmp_path / "m")
    c = ModelConfig.from_path(d)
    assert c.head_dim == 16 and c.num_kv_heads == 4 and c.eos_token_ids == frozenset({2})


def test_model_config_from_bare_json_file(tmp_path: Path):
    d = _write_config(tmp_path / "m")
    path = tmp_path / "llama-tiny.json"
    (d / "config.json").rename(path)
    assert resolve_model(str(path)).local_dir == path.resolve()
    assert ModelConfig.from_path(path).hidden_size == 64


@pytest.mark.parametrize(
    "name,device,checkpoint,model_type,want",
    [
        ("auto", "cpu", "bfloat16", "llama", torch.float32),
        ("auto", "cuda:1", "float16", "llama", torch.float16),
        ("auto", "cuda", "torch.bfloat16", "qwen2", torch.bfloat16),
        # float32 or unstated checkpoints run in 16 bits on CUDA, Gemma's in bfloat16
        ("auto", "cuda", None, "llama", torch.float16),
        ("auto", "cuda", "float32", "bert", torch.float16),
        ("auto", "cuda", torch.float32, "gemma2", torch.bfloat16),
        ("auto", "cpu", "float32", "gemma2", torch.float32),
        ("half", "cpu", None, "llama", torch.float16),
        ("bf16", "cpu", None, "llama", torch.bfloat16),
        ("float", "cuda", "bfloat16", "gemma", torch.float32),
        ("fp32", "cpu", None, "llama", torch.float32),
    ],
)
def test_dtype_resolution(name, device, checkpoint, model_type, want):
    assert resolve_dtype(name, checkpoint, device, model_type) == want


def test_dtype_resolution_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", None, "cpu")


def test_get_tokenizer_of_tiny_model(tmp_path: Path):
    d = make_tiny_model("llama", tmp_path)
    tok = get_tokenizer(str(d))
    assert tok.eos_token_id == 258 and tok.encode("hé", add_special_tokens=False) == [104, 195, 169]
    with pytest.raises(ModelNotFoundError):
        get_tokenizer(str(tmp_path / "absent"))
