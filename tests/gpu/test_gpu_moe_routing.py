"""On a CUDA GPU: kernels.moe_routing and kernels.shared_expert_gate against their torch references,
both replayed from a CUDA graph with new inputs; the fast path's MoE block (routing op, the shared
gate merged into the router's GEMM, the one-launch tail) against the plain block at Qwen1.5-MoE-
A2.7B's widths (H 2048, 60 experts, top-4, shared expert 5632), eager and from a CUDA graph; and a
tiny Qwen2-MoE whose fast path with decode graphs gives the torch path's greedy tokens in float32.

Ids compare exactly: the kernel selects on the logits themselves, which both sides read alike.
Weights: the GPU's exp and the order of the softmax sum differ from torch's in the last float32
bits, so float32 weights within 1e-5 relative, and rounded ones now and then one ulp of the
rounding dtype apart.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pdserve.kernels.moe_routing import moe_routing, moe_routing_ref
from pdserve.kernels.shared_expert_gate import add_gated_shared_expert, add_gated_shared_expert_ref
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_moe import TritonSparseMoeBlock
from pdserve.shared.models.fast_path import TritonGatedMLP, TritonMoEExperts
from pdserve.shared.models.moe_block import SparseMoeBlock
from pdserve.shared.models.qwen2_moe import QWEN2_MOE_EXPERT_NAMES
from tests.gpu.test_gpu_fast_path import _prompts, _run
from tests.gpu.test_gpu_fused_moe import _no_tf32  # noqa: F401  (autouse: float32 GEMMs without TF32)
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
BENCH_CONFIG = Path(__file__).resolve().parents[2] / "bench" / "configs" / "qwen1.5-moe-a2.7b.json"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _assert_routing_matches(got, want, round_to: torch.dtype | None) -> None:
    (weights, ids), (want_weights, want_ids) = got, want
    assert ids.dtype == torch.int32 and torch.equal(ids, want_ids)
    assert weights.dtype == torch.float32
    if round_to is None:
        torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-7)
        return
    ulp = torch.finfo(round_to).eps * want_weights.abs()
    assert ((weights - want_weights).abs() <= ulp).all()
    assert (weights != want_weights).float().mean().item() < 0.01


# (experts, top_k, logits dtype): Mixtral's, Qwen1.5-MoE's, DeepSeek-V2's and V3's shapes, the ends;
# a product with every dtype would compile ~70 variants for no branch more
ROUTING_CASES = [
    (8, 2, torch.bfloat16),
    (60, 4, torch.bfloat16),
    (64, 6, torch.float16),
    (160, 6, torch.float32),
    (256, 8, torch.bfloat16),
    (4, 1, torch.float32),
]


@pytest.mark.parametrize("experts,top_k,dtype", ROUTING_CASES)
@pytest.mark.parametrize("tokens", [1, 333])
def test_routing_matches_ref(experts, top_k, dtype, tokens):
    logits = (2 * torch.randn(tokens, experts, generator=_gen(tokens + experts), device=DEVICE)).to(dtype)
    for renormalize in (False, True):
        for round_to in (None, torch.bfloat16):
            got = moe_routing(logits, top_k, renormalize, round_to=round_to)
            want = moe_routing_ref(logits, top_k, renormalize, round_to=round_to)
            _assert_routing_matches(got, want, round_to)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_gate_tail_matches_ref(dtype):
    gen = _gen(5)
    routed, shared = (torch.randn(64, 2048, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    merged = (3 * torch.randn(64, 61, generator=gen, device=DEVICE)).to(dtype)
    got = add_gated_shared_expert(routed, shared, merged[:, 60])
    want = add_gated_shared_expert_ref(routed, shared, merged[:, 60])
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    eps = torch.finfo(dtype).eps  # a flipped sigmoid rounding, scaled by shared, then rounded
    assert ((got.float() - want.float()).abs() <= 2 * eps * shared.float().abs() + 1e-3).all()
    assert (got != want).float().mean().item() < 0.01


def _captured(fn, *inputs: torch.Tensor):
    """fn(*inputs) captured in a CUDA graph (compiled and warmed on a side stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*inputs)
    return graph, out


def test_routing_and_tail_replay_from_a_cuda_graph():
    """Grids from shapes only, no host read: replays with new logits give the eager results."""
    gen = _gen(9)
    logits = torch.randn(8, 61, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    routed, shared = (
        torch.randn(8, 2048, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)
    )

    def step(logits, routed, shared):
        weights, ids = moe_routing(logits[:, :60], 4, False, round_to=torch.bfloat16)
        return weights, ids, add_gated_shared_expert(routed, shared, logits[:, 60])

    graph, outs = _captured(step, logits, routed, shared)
    for _ in range(3):
        for t in (logits, routed, shared):
            t.copy_(torch.randn(t.shape, generator=gen, device=DEVICE))
        graph.replay()
        for got, want in zip(outs, step(logits, routed, shared)):
            assert torch.equal(got, want)


def _qwen_blocks(dtype: torch.dtype, seed: int):
    """(plain block with today's fast-path experts and shared MLP, TritonSparseMoeBlock) of one
    Qwen1.5-MoE-A2.7B layer with random weights, the same in both."""
    config = ModelConfig.from_path(BENCH_CONFIG, dtype=dtype, device=DEVICE)
    hf = config.hf_config
    with torch.device(DEVICE):
        block = SparseMoeBlock(
            config, 0, int(hf.num_experts), int(hf.num_experts_per_tok), int(hf.moe_intermediate_size),
            bool(hf.norm_topk_prob), QWEN2_MOE_EXPERT_NAMES, int(hf.shared_expert_intermediate_size),
        )  # fmt: skip
    gen = _gen(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, device=DEVICE) / param.shape[-1] ** 0.5)
        block.gate.weight.mul_(8)  # routing that differs from token to token
    block.experts = TritonMoEExperts(block.experts)
    assert block.shared_expert is not None
    block.shared_expert = TritonGatedMLP(block.shared_expert)
    return block, TritonSparseMoeBlock(copy.deepcopy(block))


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_block_float32_equals_plain_block(tokens):
    plain, fast = _qwen_blocks(torch.float32, seed=tokens)
    hidden = torch.randn(tokens, 2048, generator=_gen(tokens + 1), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fast.route(hidden)[1].long(), plain.route(hidden)[1])
        torch.testing.assert_close(fast(hidden), plain(hidden), rtol=1e-4, atol=1e-5)


def test_block_bfloat16_close_to_plain_block_and_replays_from_a_graph():
    """The merged GEMM may sum in another order than the router's own, so a router logit can
    round one ulp apart and, near a tie, move a token to another expert: rows routed alike must
    agree within bfloat16 rounding, and nearly all rows are routed alike. A graph of the block
    replays the eager block exactly."""
    plain, fast = _qwen_blocks(torch.bfloat16, seed=3)
    hidden = torch.randn(64, 2048, generator=_gen(4), device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = plain(hidden), fast(hidden)
        same = (fast.route(hidden)[1].long().sort().values == plain.route(hidden)[1].sort().values).all(dim=1)
        assert same.float().mean().item() >= 0.95
        g, w = got[same].float(), want[same].float()
        assert (
            (g - w).abs() <= 4 * torch.finfo(torch.bfloat16).eps * w.abs().amax(dim=1, keepdim=True)
        ).all()
        static = hidden[:8].clone()
        graph, out = _captured(fast, static)
        for seed in range(3):
            static.copy_(torch.randn(static.shape, generator=_gen(10 + seed), device=DEVICE))
            graph.replay()
            assert torch.equal(out, fast(static))


def test_tiny_qwen2_moe_fast_path_gives_the_torch_path_tokens(tmp_path: Path):
    """The engine: Triton kernels and decode CUDA graphs against the torch path, float32, greedy."""
    model_dir = str(make_tiny_model("qwen2_moe", tmp_path))
    for n in (1, 3):
        prompts = _prompts(n, 500)
        ref, _, _ = _run(model_dir, prompts, "float32", attention_backend="torch", disable_cuda_graph=True)
        got, backend, graphs = _run(model_dir, prompts, "float32", cuda_graph_max_bs=16)
        assert backend == "TritonAttention" and graphs is not None
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a["output_ids"] == b["output_ids"], f"n={n} prompt {i}"
