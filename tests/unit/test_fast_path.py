"""shared.models.fast_path on tiny random models (float32, CPU, Triton interpreter).

A model with the Triton kernels swapped in gives the hidden states and logits of the plain model
within 1e-5, through a batched prefill over scattered pages, a chunk on top of a cached prefix and
a decode step. Llama covers llama3 rope scaling; Qwen3 its per-head q/k norms. With the Triton
attention backend, each layer rotates q/k and stores K/V in one launch (kernels.rope.rotary_store_kv).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.attention_triton import TritonAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import (
    TritonApplyRotary,
    TritonGatedMLP,
    TritonRMSNorm,
    TritonRotaryEmbedding,
    use_triton_kernels,
)
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.layers import GatedMLP, RMSNorm
from pdserve.shared.models.loader import iter_weights, load_model
from tests.helpers.tiny_models import make_tiny_model

PAGE_SIZE = 4
ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    model_dir = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    config = ModelConfig.from_path(model_dir)
    return config, model_dir


def _pool(config: ModelConfig) -> PagedKVPool:
    shape = KVPoolShape(config.num_layers, 24, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    return PagedKVPool(shape, torch.float32, "cpu")


def _steps():
    """(mode, ids, prefix_lens, extend_lens, page_tables): two prompts, a chunk on a prefix, a decode."""
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 512, (n,), generator=gen).tolist()

    a_pages, b_pages = [5, 2, 9, 14, 3], [7, 20, 11]
    return [
        (ForwardMode.EXTEND, ids(9 + 6), [0, 0], [9, 6], [a_pages, b_pages]),
        (ForwardMode.EXTEND, ids(5 + 1), [9, 6], [5, 1], [a_pages, b_pages]),
        (ForwardMode.DECODE, ids(2), [14, 7], [1, 1], [a_pages, b_pages]),
    ]


@torch.no_grad()
def _run(
    model, config: ModelConfig, backend=TorchRefAttention, pool=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pool = _pool(config) if pool is None else pool
    outs = []
    for mode, ids, prefix, extend, pages in _steps():
        batch = ForwardBatch.build(mode, ids, prefix, extend, pages, PAGE_SIZE, pool, backend())
        hidden = model(batch)
        outs.append((hidden.clone(), model.compute_logits(hidden[batch.logits_indices])))
    return outs


class _OpCounts(TorchDispatchMode):
    """Counts the pdserve custom ops called (each is one kernel launch)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("pdserve."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _expected_swaps(model) -> int:
    norms = sum(type(m) is RMSNorm for m in model.modules())
    mlps = sum(type(m) is GatedMLP for m in model.modules())
    return norms + mlps + 1 + len(model.model.layers)  # + rotary_emb and each layer's rotary


def test_pass_matches_plain_model(tiny):
    config, model_dir = tiny
    plain = load_model(config, model_dir)
    fast = load_model(config, model_dir)
    params_before = {name: p.data_ptr() for name, p in fast.named_parameters()}
    expected = _expected_swaps(fast)
    assert use_triton_kernels(fast) == expected
    assert use_triton_kernels(fast) == 0  # a second pass finds nothing left to swap
    # Same parameters, same names: loading and weight updates see the model they saw before.
    assert {name: p.data_ptr() for name, p in fast.named_parameters()} == params_before
    assert not any(type(m) in (RMSNorm, GatedMLP) for m in fast.modules())
    assert isinstance(fast.model.rotary_emb, TritonRotaryEmbedding)
    layer = fast.model.layers[0]
    assert isinstance(layer.self_attn.rotary, TritonApplyRotary)
    assert isinstance(layer.input_layernorm, TritonRMSNorm) and isinstance(layer.mlp, TritonGatedMLP)
    if config.hf_config.model_type == "qwen3":
        assert isinstance(layer.self_attn.q_norm, TritonRMSNorm)
    for (want_hidden, want_logits), (got_hidden, got_logits) in zip(_run(plain, config), _run(fast, config)):
        assert want_logits.abs().max().item() > 0.1  # random weights: the comparison means something
        torch.testing.assert_close(got_hidden, want_hidden, rtol=0, atol=ATOL)
        torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=ATOL)


def test_weights_and_buffers_reload_after_the_pass(tiny):
    config, model_dir = tiny
    plain = load_model(config, model_dir)
    fast = load_model(config, model_dir)
    use_triton_kernels(fast)
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(0.5)  # spoil, then reload from the checkpoint through the usual path
    fast.load_weights(iter_weights(model_dir))
    # A new tensor, not fill_: on CPU inv_freq may be the host copy that reset_buffers reads.
    fast.model.rotary_emb.inv_freq = torch.zeros_like(fast.model.rotary_emb.inv_freq)
    fast.reset_buffers()
    torch.testing.assert_close(
        fast.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq, rtol=0, atol=0
    )
    want, got = _run(plain, config)[0], _run(fast, config)[0]
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=ATOL)


def test_triton_backend_fuses_rope_and_kv_store(tiny):
    config, model_dir = tiny
    plain = load_model(config, model_dir)
    fast = load_model(config, model_dir)
    use_triton_kernels(fast)
    plain_pool, fast_pool = _pool(config), _pool(config)
    want = _run(plain, config, TorchRefAttention, plain_pool)
    with _OpCounts() as ops:
        got = _run(fast, config, TritonAttention, fast_pool)
    for (want_hidden, want_logits), (got_hidden, got_logits) in zip(want, got):
        torch.testing.assert_close(got_hidden, want_hidden, rtol=0, atol=ATOL)
        torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(fast_pool.kv, plain_pool.kv, rtol=0, atol=ATOL)
    launches = len(_steps()) * config.num_layers
    assert ops.counts["pdserve.rotary_store_kv_"] == launches
    assert "pdserve.rotary_" not in ops.counts and "pdserve.store_kv_" not in ops.counts
