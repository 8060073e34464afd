"""torch.compile over the fast path on CPU (inductor's C++ backend, Triton kernels in the interpreter).

A tiny Llama with the Triton kernels and attention backend, compiled, greedily decodes the tokens
of the same model run eagerly; the KV pool tensor is written in place (same storage, the steps'
slots filled) and inductor's generated code allocates nothing the size of one layer of the pool:
the kernels are custom ops that declare their writes, so the pool is never copied around them.
Then the engine flag end to end: `--enable-torch-compile` greedy tokens equal those without it.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.attention_triton import TritonAttention
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import use_triton_kernels
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.loader import load_model
from tests.helpers.tiny_models import make_tiny_model

PAGE_SIZE = 4
NUM_PAGES = 64  # one layer's K (64 x 4 x 2 heads x 16) outsizes every activation of the tiny model
PAGES = [[5, 2, 9, 14], [7, 20, 11, 3]]
PROMPTS = [[11, 300, 42, 7, 99, 250, 3], [400, 5, 77]]
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def _fast_model(model_dir):
    config = ModelConfig.from_path(model_dir)
    model = load_model(config, model_dir)
    use_triton_kernels(model)
    pool = PagedKVPool(
        KVPoolShape(config.num_layers, NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim),
        torch.float32,
        "cpu",
    )
    return model, pool


def _slots(prefix: list[int], extend: list[int]) -> list[int]:
    return [
        pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
        for pages, c, e in zip(PAGES, prefix, extend)
        for p in range(c, c + e)
    ]


@torch.inference_mode()
def _greedy(forward, model, pool, codes: list[str]) -> tuple[list[list[int]], torch.Tensor]:
    """Prefill both prompts, then DECODE_STEPS greedy steps; returns the tokens and the last logits."""
    backend = TritonAttention()
    ids = [t for prompt in PROMPTS for t in prompt]
    prefix, extend = [0, 0], [len(p) for p in PROMPTS]
    mode, tokens, logits = ForwardMode.EXTEND, [[], []], None
    for step in range(DECODE_STEPS + 1):
        batch = ForwardBatch.build(mode, ids, prefix, extend, PAGES, PAGE_SIZE, pool, backend)
        if step < 2:  # the prefill's and the first decode step's compiled code
            hidden, step_codes = run_and_get_code(forward, batch)
            codes.extend(step_codes)
        else:
            hidden = forward(batch)
        logits = model.compute_logits(hidden[batch.logits_indices])
        ids = logits.argmax(-1).tolist()
        for out, token in zip(tokens, ids):
            out.append(token)
        prefix, extend, mode = [c + e for c, e in zip(prefix, extend)], [1, 1], ForwardMode.DECODE
    return tokens, logits


def _allocated_numels(code: str) -> list[int]:
    """Element counts of the buffers the generated `call` allocates."""
    body = code[code.index("def call(") : code.index("def get_args(")]
    shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", body)
    return [eval("*".join(d for d in s.replace(" ", "").split(",") if d) or "1") for s in shapes]


def test_compiled_fast_path_decodes_like_eager_and_writes_the_pool_in_place(llama_dir):
    torch._dynamo.reset()
    model, eager_pool = _fast_model(llama_dir)
    want_tokens, want_logits = _greedy(model.forward, model, eager_pool, [])
    _, pool = _fast_model(llama_dir)
    storage = pool.kv.untyped_storage().data_ptr()
    codes: list[str] = []
    got_tokens, got_logits = _greedy(torch.compile(model.forward), model, pool, codes)

    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)
    assert pool.kv.untyped_storage().data_ptr() == storage
    prompt_lens = [len(p) for p in PROMPTS]
    written = _slots([0, 0], prompt_lens) + _slots(prompt_lens, [DECODE_STEPS] * 2)
    flat = pool.kv.view(pool.shape.num_layers, 2, -1, pool.shape.num_kv_heads, pool.shape.head_dim)
    unwritten = torch.ones(flat.shape[2], dtype=torch.bool)
    unwritten[written] = False
    assert (flat[:, :, written] != 0).all(dim=(-1, -2)).all()  # every layer's K and V at every slot
    assert (flat[:, :, unwritten] == 0).all()
    torch.testing.assert_close(pool.kv, eager_pool.kv, rtol=0, atol=1e-4)

    assert len(codes) == 2  # the prefill and the decode graphs were compiled, not run eagerly
    layer_k = pool.shape.num_pages * pool.shape.page_size * pool.shape.num_kv_heads * pool.shape.head_dim
    for code in codes:
        assert "pdserve.rotary_store_kv_" in code and "pdserve.fused_add_rmsnorm_" in code
        assert max(_allocated_numels(code)) < layer_k, "a copy of the KV pool"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_engine_flag_gives_the_same_greedy_tokens(llama_dir, backend):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    params = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}

    def generate(**flags) -> list[list[int]]:
        args = EngineArgs(model_path=str(llama_dir), attention_backend=backend, max_total_tokens=256, **flags)
        engine = Engine(args)
        return [out["output_ids"] for out in engine.generate(PROMPTS, params)]

    compiled = generate(enable_torch_compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # prefill and decode ran compiled
    assert compiled == generate()
