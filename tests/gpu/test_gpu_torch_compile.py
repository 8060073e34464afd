"""On a CUDA GPU: `--enable-torch-compile` (decode graphs captured over a torch.compile'd forward).

- The engine with the flag gives the greedy tokens of the engine without it (float32, tiny Llama).
- The compiled graphs write the KV pool in place: capturing them allocates far less than one
  layer of a large pool (the bug this guards against: inductor copied the whole pool, 22.6 GiB on
  an 8B model), and a replayed decode step writes its slots of `pool.kv` with the values and
  logits of the eager step.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.attention_triton import TritonAttention
from pdserve.shared.engine.cuda_graph_runner import DecodeGraphRunner, DecodeInputs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import use_triton_kernels
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.loader import load_model
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
PAGE_SIZE = 16


def _generate(model_dir: str, **flags) -> list[dict]:
    args = EngineArgs(model_path=model_dir, device="cuda", dtype="float32", max_total_tokens=4096, **flags)
    engine = Engine(args)
    try:
        prompts = [[5 + i, 300, 42, 7 * i + 1] * (i + 1) for i in range(3)]
        return engine.generate(prompts, {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True})
    finally:
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def test_engine_with_the_flag_gives_the_same_tokens(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model_dir = str(make_tiny_model("llama", tmp_path))
    # max bs 2: buckets 1 and 2 compiled (autotuned); 3 requests decode eagerly until one finishes
    want = _generate(model_dir, cuda_graph_max_bs=2)
    got = _generate(model_dir, cuda_graph_max_bs=2, enable_torch_compile=True)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]


@torch.inference_mode()
def test_compiled_graphs_write_the_pool_in_place(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model_dir = make_tiny_model("llama", tmp_path)
    config = ModelConfig.from_path(model_dir)
    model = load_model(config, model_dir, device=DEVICE)
    use_triton_kernels(model)
    # ~768 MiB of float32 KV (3 layers): a copy of even one layer's K would be 128 MiB
    shape = KVPoolShape(config.num_layers, 65536, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    pool = PagedKVPool(shape, torch.float32, DEVICE)
    backend = TritonAttention()
    pages = [[3, 8], [5, 9]]
    prompts = [[11, 300, 42, 7, 99, 250, 3, 17, 4, 4, 8, 100, 1, 2, 3, 4, 5, 6], [400, 5, 77]]
    prefill = ForwardBatch.build(
        ForwardMode.EXTEND,
        prompts[0] + prompts[1],
        [0, 0],
        [18, 3],
        pages,
        PAGE_SIZE,
        pool,
        backend,
        device=DEVICE,
    )
    model.forward(prefill)
    step = DecodeInputs([21, 22], [18, 3], [8 * PAGE_SIZE + 2, 5 * PAGE_SIZE + 3], pages)
    decode = ForwardBatch.build(
        ForwardMode.DECODE,
        step.input_ids,
        step.positions,
        [1, 1],
        pages,
        PAGE_SIZE,
        pool,
        backend,
        device=DEVICE,
    )
    before_step = pool.kv.clone()
    eager_logits = model.compute_logits(model.forward(decode))  # writes the step's slots
    eager_pool = pool.kv.clone()
    pool.kv.copy_(before_step)  # the graphs replay the same step on the same pool
    del before_step

    graphs = DecodeGraphRunner(model, pool, backend, 2, 4, DEVICE, compile_forward=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graphs.capture()
    # below the smallest copy, one layer's K (128 MiB); capture's own buffers (autotuning, the
    # graphs' activations) peaked at 82 MiB on an H100
    assert torch.cuda.max_memory_allocated() - before < 128 * 2**20, "capture allocated a copy of the pool"
    storage = pool.kv.untyped_storage().data_ptr()
    page0 = pool.kv[:, :, 0].clone()  # capture and padding rows write page 0 only
    logits = graphs.replay(step).clone()
    assert pool.kv.untyped_storage().data_ptr() == storage
    pool.kv[:, :, 0] = page0
    eager_pool[:, :, 0] = page0
    torch.testing.assert_close(pool.kv, eager_pool, rtol=0, atol=1e-5)
    flat = pool.kv.view(config.num_layers, 2, -1, config.num_kv_heads, config.head_dim)
    assert (flat[:, :, step.slots] != 0).all()
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-4)
