"""Our model family against Hugging Face transformers on tiny random checkpoints (CPU, float32).

For every tiny kind: whole-prompt logits, the same prompt fed in chunks over non-contiguous pages
and then token by token, and a batch of three requests, all equal HF's logits within 1e-4. Also
the loader's errors, dummy weights, the registry and rope frequencies against transformers'.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.registry import get_model_class, supported_architectures
from pdserve.shared.models.rope import RopeConfig
from pdserve.shared.models.weights import WeightLoadError
from tests.helpers.tiny_models import TINY_KINDS, make_tiny_model, tiny_config

ATOL = 1e-4
PAGE_SIZE = 4


class Tiny:
    def __init__(self, kind: str, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.dir = model_dir
        self.config = ModelConfig.from_path(model_dir)
        self.model = load_model(self.config, model_dir)
        self.hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def pool(self, num_pages: int = 64) -> PagedKVPool:
        c = self.config
        shape = KVPoolShape(c.num_layers, num_pages, PAGE_SIZE, c.num_kv_heads, c.head_dim, c.kv_planes)
        return PagedKVPool(shape, torch.float32, "cpu")

    @torch.no_grad()
    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        return self.hf(torch.tensor([ids])).logits[0].float()

    @torch.no_grad()
    def run(
        self, pool, mode, ids, prefix_lens, extend_lens, page_tables, all_rows: bool = True
    ) -> torch.Tensor:
        """Our logits for every new token (all_rows) or the last new token of each request."""
        rows = list(range(len(ids))) if all_rows else None
        batch = ForwardBatch.build(
            mode,
            ids,
            prefix_lens,
            extend_lens,
            page_tables,
            PAGE_SIZE,
            pool,
            TorchRefAttention(),
            logits_indices=rows,
        )
        hidden = self.model(batch)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def assert_whole_and_chunked_match_hf(self, ids: list[int]) -> None:
        """The prompt whole, then in two chunks and decode steps over scattered pages: HF's logits."""
        ref = self.hf_logits(ids)
        whole = self.run(self.pool(), ForwardMode.EXTEND, ids, [0], [len(ids)], [[3, 4, 5, 6, 7, 8]])
        assert ref.abs().max().item() > 0.5
        assert (whole - ref).abs().max().item() < ATOL
        pool, pages, got, done = self.pool(), [9, 2, 14, 5, 11, 30], [], 0
        for chunk in (7, 6):
            got.append(self.run(pool, ForwardMode.EXTEND, ids[done : done + chunk], [done], [chunk], [pages]))
            done += chunk
        while done < len(ids):
            got.append(self.run(pool, ForwardMode.DECODE, ids[done : done + 1], [done], [1], [pages]))
            done += 1
        assert (torch.cat(got) - ref).abs().max().item() < ATOL


@pytest.fixture(scope="module", params=TINY_KINDS)
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 512) for _ in range(n)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_whole_prompt_logits_match_hf(tiny: Tiny):
    ids = _prompt(23, seed=1)
    ours = tiny.run(tiny.pool(), ForwardMode.EXTEND, ids, [0], [len(ids)], [[3, 4, 5, 6, 7, 8]])
    ref = tiny.hf_logits(ids)
    assert ours.dtype == torch.float32
    assert ref.abs().max().item() > 0.5  # random weights give spread-out logits, so the check means something
    assert _max_diff(ours, ref) < ATOL


def test_chunks_then_decode_match_hf(tiny: Tiny):
    ids = _prompt(19, seed=2)
    ref = tiny.hf_logits(ids)
    pool = tiny.pool()
    pages = [9, 2, 14, 5, 11]  # shuffled, non-contiguous; covers 20 tokens
    got, done = [], 0
    for chunk in (6, 5, 4):  # chunked prefill: each chunk sees the earlier ones through the pool
        got.append(tiny.run(pool, ForwardMode.EXTEND, ids[done : done + chunk], [done], [chunk], [pages]))
        done += chunk
    while done < len(ids):  # then decode, one token per pass
        got.append(tiny.run(pool, ForwardMode.DECODE, ids[done : done + 1], [done], [1], [pages]))
        done += 1
    assert _max_diff(torch.cat(got), ref) < ATOL


def test_batch_of_three_equals_each_alone(tiny: Tiny):
    prompts = [_prompt(n, seed=10 + n) for n in (3, 11, 7)]
    tables = [[20, 4], [7, 31, 2], [13, 25]]
    alone = [
        tiny.run(tiny.pool(), ForwardMode.EXTEND, p, [0], [len(p)], [t]) for p, t in zip(prompts, tables)
    ]
    pool = tiny.pool()
    together = tiny.run(
        pool,
        ForwardMode.EXTEND,
        [t for p in prompts for t in p],
        [0, 0, 0],
        [len(p) for p in prompts],
        tables,
    )
    assert _max_diff(together, torch.cat(alone)) < 1e-5
    for p, mine in zip(prompts, alone):
        assert _max_diff(mine, tiny.hf_logits(p)) < ATOL
    # One decode step for all three at once, each continuing its own sequence.
    nxt = [5, 6, 7]
    step = tiny.run(pool, ForwardMode.DECODE, nxt, [len(p) for p in prompts], [1, 1, 1], tables)
    for i, p in enumerate(prompts):
        assert _max_diff(step[i], tiny.hf_logits(p + [nxt[i]])[-1]) < ATOL


def test_eos_ids_union_config_and_generation_config(tmp_path: Path):
    d = make_tiny_model("qwen3", tmp_path)
    assert ModelConfig.from_path(d).eos_token_ids == frozenset({256, 258})


def test_missing_and_unexpected_tensors_are_clear_errors(tmp_path: Path):
    d = make_tiny_model("llama", tmp_path)
    config = ModelConfig.from_path(d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(config, d)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"unexpected.*model\.layers\.0\.mlp\.extra\.weight"):
        load_model(config, d)
    del tensors["model.layers.0.mlp.extra.weight"]
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(
        WeightLoadError, match=r"k_proj.weight: checkpoint shape \(16, 64\) != model shape \(32, 64\)"
    ):
        load_model(config, d)


def test_sharded_checkpoint_and_tied_lm_head_in_file(tmp_path: Path):
    import json

    src = make_tiny_model("qwen2", tmp_path / "src")
    config = ModelConfig.from_path(src)
    reference = load_model(config, src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # some tied exports keep it
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_model(config, out)
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_dummy_weights_are_deterministic():
    config = ModelConfig.from_hf_config(tiny_config("qwen3"))
    a, b = load_model(config, None, "dummy", seed=3), load_model(config, None, "dummy", seed=3)
    c = load_model(config, None, "dummy", seed=4)
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    assert torch.equal(a.state_dict()[qkv], b.state_dict()[qkv])
    assert not torch.equal(a.state_dict()[qkv], c.state_dict()[qkv])
    assert abs(a.state_dict()[qkv].std().item() - 0.02) < 0.002
    assert torch.equal(a.state_dict()["model.layers.0.self_attn.q_norm.weight"], torch.ones(32))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_registry_names_unknown_architecture():
    assert supported_architectures() == [
        "BertForSequenceClassification",
        "BertModel",
        "DeepseekV2ForCausalLM",
        "Gemma2ForCausalLM",
        "GemmaForCausalLM",
        "LlamaForCausalLM",
        "LlamaForSequenceClassification",
        "LlamaModel",
        "MistralForCausalLM",
        "MistralForSequenceClassification",
        "MistralModel",
        "MixtralForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2ForSequenceClassification",
        "Qwen2Model",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "XLMRobertaForSequenceClassification",
        "XLMRobertaModel",
    ]
    assert get_model_class(["FooForCausalLM", "Qwen2ForCausalLM"]).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError, match=r"\['DeepseekV3ForCausalLM'\] is not supported; supported: Bert"):
        get_model_class(["DeepseekV3ForCausalLM"])


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    ],
)
def test_rope_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        max_position_embeddings=1024,
        rope_theta=5000.0,
        rope_scaling=rope,
    )
    ours, our_scale = RopeConfig.from_hf_config(hf).inv_freq_and_scaling()
    if rope is None:
        ref, ref_scale = 1.0 / (5000.0 ** (torch.arange(0, 32, 2).float() / 32)), 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu"))
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0) and our_scale == pytest.approx(ref_scale)
    if rope is not None and rope["rope_type"] != "yarn":
        assert not torch.allclose(ours, 1.0 / (5000.0 ** (torch.arange(0, 32, 2).float() / 32)))
