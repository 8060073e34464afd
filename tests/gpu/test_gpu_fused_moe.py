"""On a CUDA GPU: kernels.fused_moe against fused_moe_ref at real model sizes in bfloat16
(Qwen1.5-MoE-A2.7B: H 2048, I 1408, 60 experts, top-4; Mixtral-8x7B: H 4096, I 14336, 8 experts,
top-2), float32 (no TF32: the exactness path), a shard, and a CUDA-graph replay with new routing.

bfloat16 tolerance: kernel and reference round at the same points, but their float32 GEMM sums run
in different orders, so a gate or up value now and then rounds one bfloat16 ulp (2**-8 relative)
the other way and nudges its token's row; the output's own rounding adds half an ulp. Both stay
within about one ulp of the output's scale, far below what a wrong expert or weight would give.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref, select_experts

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
QWEN_MOE = (2048, 1408, 60, 4)  # hidden, intermediate, experts, top-k
MIXTRAL = (4096, 14336, 8, 2)


@pytest.fixture(autouse=True)
def _no_tf32():
    """The float32 reference must be float32 GEMMs, whatever an earlier test set."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _layer(hidden: int, inter: int, experts: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen, device=DEVICE) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen, device=DEVICE) / inter**0.5).to(dtype)
    return w13, w2, gen


def _inputs(tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype, gen: torch.Generator):
    x = torch.randn(tokens, hidden, generator=gen, device=DEVICE).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen, device=DEVICE)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, weights, ids


def _assert_close_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    assert not got.isnan().any()
    g, w = got.float(), want.float()
    scale = w.abs().max().item()
    eps = torch.finfo(torch.bfloat16).eps  # 2**-7: one ulp at 1.0 .. 2.0
    assert (g - w).abs().max().item() <= eps * scale, ((g - w).abs().max().item(), scale)
    assert ((g - w).norm() / w.norm()).item() < 4e-3


@pytest.mark.parametrize(
    "shape,tokens",
    [(QWEN_MOE, 1), (QWEN_MOE, 64), (MIXTRAL, 1)],
    ids=["qwen-moe-T1", "qwen-moe-T64", "mixtral-T1"],
)
def test_bf16_real_sizes(shape, tokens):
    hidden, inter, experts, top_k = shape
    w13, w2, gen = _layer(hidden, inter, experts, torch.bfloat16, seed=tokens + experts)
    x, weights, ids = _inputs(tokens, hidden, experts, top_k, torch.bfloat16, gen)
    got = fused_moe(x, w13, w2, weights, ids)
    _assert_close_bf16(got, fused_moe_ref(x, w13, w2, weights, ids))


def test_bf16_prefill_tiles_and_shard():
    """512 tokens take the 64-row tiles; experts 20..39 of 60 as the local shard."""
    hidden, inter, experts, top_k = QWEN_MOE
    w13, w2, gen = _layer(hidden, inter, 20, torch.bfloat16, seed=5)
    x, weights, ids = _inputs(512, hidden, experts, top_k, torch.bfloat16, gen)
    got = fused_moe(x, w13, w2, weights, ids, expert_offset=20)
    want = fused_moe_ref(x, w13, w2, weights, ids, expert_offset=20)
    no_local = ((ids < 20) | (ids >= 40)).all(dim=1)
    assert no_local.any() and (got[no_local] == 0).all()
    _assert_close_bf16(got, want)


@pytest.mark.parametrize("tokens", [1, 64])
def test_float32_exact_path(tokens):
    hidden, inter, experts, top_k = 1024, 704, 60, 4
    w13, w2, gen = _layer(hidden, inter, experts, torch.float32, seed=tokens)
    x, weights, ids = _inputs(tokens, hidden, experts, top_k, torch.float32, gen)
    got = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-4)


def test_cuda_graph_replay_with_new_routing():
    """Captured once, replayed after the routing changed: the launch reads no value back to the
    host (capture would fail on a sync) and its grid does not depend on the ids."""
    hidden, inter, experts, top_k = QWEN_MOE
    w13, w2, gen = _layer(hidden, inter, experts, torch.bfloat16, seed=9)
    x, weights, ids = _inputs(8, hidden, experts, top_k, torch.bfloat16, gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_moe(x, w13, w2, weights, ids)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    for step in range(3):
        x2, weights2, ids2 = _inputs(8, hidden, experts, top_k, torch.bfloat16, gen)
        if step == 2:
            ids2[:4] = 61  # off this shard: those pairs drop out
        x.copy_(x2)
        weights.copy_(weights2)
        ids.copy_(ids2)
        graph.replay()
        torch.testing.assert_close(out, fused_moe(x, w13, w2, weights, ids), rtol=0, atol=0)
