"""shared.models.fp8_fused on a tiny random fp8 Llama (float32, CPU, Triton interpreter).

With the fast path on, the pass makes the norms and the SiLU-and-mul hand quantized rows to the
fp8 linears; the logits (and so the greedy tokens) are the unfused model's, bit for bit, through a
batched prefill and greedy decode steps. The row-parallel tensor-parallel linear is left alone.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import TritonGatedMLP, use_triton_kernels
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.fp8_fused import Fp8InputGatedMLP, Fp8InputRMSNorm, fuse_fp8_inputs
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.tensor_parallel_fp8 import Fp8RowParallelLinear
from tests.helpers.tiny_models import make_tiny_model
from tests.unit.test_fast_path import _OpCounts

PAGE_SIZE = 4
PROMPTS = [[5, 99, 311, 42, 7, 8, 150, 3, 61], [400, 12, 77, 250, 9, 33]]
DECODE_STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return ModelConfig.from_path(model_dir, dtype="float32"), model_dir


def _fast_fp8(config: ModelConfig, model_dir) -> torch.nn.Module:
    model = load_model(config, model_dir, quantization="fp8")
    use_triton_kernels(model)
    return model


@torch.no_grad()
def greedy_steps(
    model, config: ModelConfig, device: str = "cpu"
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits of a batched prefill and DECODE_STEPS greedy steps of both prompts; the tokens."""
    shape = KVPoolShape(config.num_layers, 16, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    pool = PagedKVPool(shape, config.dtype, device)
    pages = [[5, 2, 9, 14], [7, 1, 11]]
    lens = [len(p) for p in PROMPTS]
    mode, ids, prefix, extend = ForwardMode.EXTEND, [t for p in PROMPTS for t in p], [0, 0], lens
    all_logits, tokens = [], [[], []]
    for _ in range(DECODE_STEPS + 1):
        batch = ForwardBatch.build(
            mode, ids, prefix, extend, pages, PAGE_SIZE, pool, TorchRefAttention(), device=device
        )
        logits = model.compute_logits(model(batch)[batch.logits_indices])
        all_logits.append(logits)
        ids = logits.argmax(-1).tolist()
        for seq, token in zip(tokens, ids):
            seq.append(token)
        mode, prefix, extend = ForwardMode.DECODE, [p + e for p, e in zip(prefix, extend)], [1, 1]
    return all_logits, tokens


def test_fused_inputs_give_the_unfused_logits_and_tokens(tiny):
    config, model_dir = tiny
    unfused, fused = _fast_fp8(config, model_dir), _fast_fp8(config, model_dir)
    params_before = {name: p.data_ptr() for name, p in fused.named_parameters()}
    layers = config.num_layers
    assert fuse_fp8_inputs(fused) == 3 * layers  # two norms and the MLP of every layer
    assert fuse_fp8_inputs(fused) == 0
    assert {name: p.data_ptr() for name, p in fused.named_parameters()} == params_before
    layer = fused.model.layers[0]
    assert isinstance(layer.input_layernorm, Fp8InputRMSNorm) and isinstance(layer.mlp, Fp8InputGatedMLP)
    assert type(fused.model.norm) is not Fp8InputRMSNorm  # the final norm feeds the 16-bit lm_head

    want_logits, want_tokens = greedy_steps(unfused, config)
    with _OpCounts() as ops:
        got_logits, got_tokens = greedy_steps(fused, config)
    assert want_logits[0].abs().max().item() > 0.1  # random weights: the comparison means something
    for got, want in zip(got_logits, want_logits):
        assert torch.equal(got, want)
    assert got_tokens == want_tokens
    steps = DECODE_STEPS + 1
    assert ops.counts["pdserve.rmsnorm_fp8"] == steps  # layer 0's input norm has no residual yet
    assert ops.counts["pdserve.fused_add_rmsnorm_fp8_"] == steps * (2 * layers - 1)
    assert ops.counts["pdserve.silu_mul_fp8"] == steps * layers
    assert ops.counts["pdserve.fused_add_rmsnorm_"] == steps  # the final norm only
    assert "pdserve.silu_and_mul" not in ops.counts


def test_row_parallel_down_proj_keeps_its_own_quantization(tiny):
    """A tensor-parallel rank's down_proj quantizes with the whole row's amax across ranks: its
    MLP and post-attention norm stay as they were where it is not a plain Fp8Linear."""
    config, model_dir = tiny
    model = _fast_fp8(config, model_dir)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = Fp8RowParallelLinear.like(mlp.down_proj)
    assert fuse_fp8_inputs(model) == 3 * config.num_layers - 1
    layer = model.model.layers[0]
    assert type(layer.mlp) is TritonGatedMLP and isinstance(layer.post_attention_layernorm, Fp8InputRMSNorm)
    # without fp8 linears the pass finds nothing
    plain = load_model(config, model_dir)
    use_triton_kernels(plain)
    assert fuse_fp8_inputs(plain) == 0
