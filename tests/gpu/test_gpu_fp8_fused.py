"""On a CUDA GPU, bfloat16: the fused norm/activation + fp8 quantization kernels give the bits and
scales of the unfused kernels followed by per_token_quant_fp8 (compiled, where reductions and
divisions could differ from the interpreter), at Llama-3.1-8B's widths; and an fp8 tiny Llama with
fuse_fp8_inputs gives the unfused model's logits, bit for bit, eager and at a decode batch's M."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.fp8_quant import per_token_quant_fp8
from pdserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from pdserve.kernels.rmsnorm_fp8 import fused_add_rmsnorm_fp8, rmsnorm_fp8
from pdserve.kernels.silu_mul_fp8 import silu_mul_fp8
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import use_triton_kernels
from pdserve.shared.models.fp8_fused import fuse_fp8_inputs
from pdserve.shared.models.loader import load_model
from tests.helpers.tiny_models import make_tiny_model
from tests.unit.test_fp8_fused import greedy_steps
from tests.unit.test_kernel_fp8_fused_inputs import assert_same_rows

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPE = torch.bfloat16


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_fused_kernels_bit_exact_with_the_unfused_path(tokens):
    gen = torch.Generator(device=DEVICE).manual_seed(tokens)
    hidden, inter = 4096, 14336
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=DEVICE)).to(DTYPE)
    x = (3 * torch.randn(tokens, hidden, generator=gen, device=DEVICE)).to(DTYPE)
    residual = (3 * torch.randn(tokens, hidden, generator=gen, device=DEVICE)).to(DTYPE)
    assert_same_rows(rmsnorm_fp8(x, weight, 1e-5), per_token_quant_fp8(rmsnorm(x, weight, 1e-5)))
    fused_residual = residual.clone()
    got = fused_add_rmsnorm_fp8(x, fused_residual, weight, 1e-5)
    normed, summed = fused_add_rmsnorm(x.clone(), residual.clone(), weight, 1e-5)
    assert torch.equal(fused_residual, summed)
    assert_same_rows(got, per_token_quant_fp8(normed))
    gate_up = (4 * torch.randn(tokens, 2 * inter, generator=gen, device=DEVICE)).to(DTYPE)
    assert_same_rows(silu_mul_fp8(gate_up), per_token_quant_fp8(silu_and_mul(gate_up)))


def test_fused_tiny_llama_logits_bit_exact(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    config = ModelConfig.from_path(model_dir, dtype="bfloat16")
    models = []
    for fuse in (False, True):
        model = load_model(config, model_dir, device=DEVICE, quantization="fp8")
        use_triton_kernels(model)
        if fuse:
            assert fuse_fp8_inputs(model) == 3 * config.num_layers
        models.append(model)
    (want_logits, want_tokens), (got_logits, got_tokens) = (greedy_steps(m, config, DEVICE) for m in models)
    for got, want in zip(got_logits, want_logits):
        assert torch.equal(got, want)
    assert got_tokens == want_tokens
