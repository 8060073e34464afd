"""On a CUDA GPU: the small Triton kernels (kernels.kv_store, page_copy, rmsnorm, rope, activation)
against their torch oracles in bfloat16 and float32, the same launches replayed from a CUDA graph,
the pool's CUDA store, kvtransfer.staging's gather/scatter bit-exact in bfloat16 on a
Llama-3-8B-shaped pool (32 layers, 8 KV heads, head_dim 128, page 16), and the fast-path pass on a
tiny model.

bfloat16 results are compared "nearly always exact, a rounding flip at most": the kernels round
where the torch code rounds, but float32 intermediates may differ in the last bits (summation
order, FMA, hardware exp/rsqrt/cos), which flips a bfloat16 rounding once in thousands of elements.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.kernels.activation import silu_and_mul, silu_and_mul_ref
from pdserve.kernels.kv_store import store_kv, store_kv_ref
from pdserve.kernels.page_copy import gather_kv_pages_ref, scatter_kv_pages_ref
from pdserve.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from pdserve.kernels.rope import apply_rotary, apply_rotary_ref
from pdserve.kvtransfer.layout import KVLayout, MessageSpec, typed_view
from pdserve.kvtransfer.staging import HostStagingPool, gather_pages, scatter_pages
from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models import rope as torch_rope
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.fast_path import use_triton_kernels
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from pdserve.shared.models.layers import RMSNorm
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.rope import RopeConfig, RotaryEmbedding
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float32]
SHAPE_8B = KVPoolShape(num_layers=32, num_pages=40, page_size=16, num_kv_heads=8, head_dim=128)
LLAMA31_ROPE = RopeConfig("llama3", 500000.0, 128, factor=8.0, original_max_position_embeddings=8192)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(dtype)


def _assert_matches(got: torch.Tensor, want: torch.Tensor, f32_tol: float = 1e-5) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=f32_tol, atol=f32_tol)
        return
    g, w = got.float(), want.float()
    # eps is one ulp relative to the value's binade (2**-7 for bfloat16). Two: a flipped first
    # rounding (normed, silu) is scaled by the second factor (weight, up) before the last rounding.
    eps = torch.finfo(got.dtype).eps
    assert ((g - w).abs() <= 2 * eps * w.abs() + 1e-6).all(), (g - w).abs().max()
    assert (got != want).float().mean().item() < 0.005


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


# ----------------------------------------------------------------------------- compute kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 4096), (333, 4096), (4096, 576), (17, 896), (5, 8192)])
def test_rmsnorm_and_fused(dtype, tokens, hidden):
    gen = _gen(tokens + hidden)
    norm = RMSNorm(hidden, 1e-5, dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(_randn(hidden, dtype=dtype, gen=gen))
    x = _randn(tokens, hidden, dtype=dtype, gen=gen, scale=3.0)
    residual = _randn(tokens, hidden, dtype=dtype, gen=gen)
    out = torch.full_like(x, float("nan"))
    rmsnorm(x, norm.weight, 1e-5, out=out)
    _assert_matches(out, rmsnorm_ref(x, norm.weight, 1e-5))
    with torch.no_grad():
        _assert_matches(out, norm(x))
        module_norm, module_sum = norm(x, residual)
    want_norm, want_sum = fused_add_rmsnorm_ref(x, residual, norm.weight, 1e-5)
    got_norm, got_sum = fused_add_rmsnorm(x.clone(), residual.clone(), norm.weight, 1e-5)
    assert torch.equal(got_sum, want_sum) and torch.equal(got_sum, module_sum)
    _assert_matches(got_norm, want_norm)
    _assert_matches(got_norm, module_norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_of_strided_heads(dtype):
    gen = _gen(2)
    weight = _randn(128, dtype=dtype, gen=gen)
    qkv = _randn(61, (32 + 16) * 128, dtype=dtype, gen=gen)
    q = qkv[:, : 32 * 128].view(61, 32, 128)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    rmsnorm(q, weight, 1e-6, out=out)
    _assert_matches(out, rmsnorm_ref(q, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("tokens", [1, 7, 2048])
@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rope(dtype, head_dim, tokens, rope_type):
    gen = _gen(head_dim + tokens)
    cfg = RopeConfig(rope_type, 500000.0, head_dim, factor=8.0, original_max_position_embeddings=8192)
    emb = RotaryEmbedding(cfg).to(DEVICE)
    hq, hkv = 32, 8
    qkv = _randn(tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    v_before = qkv[:, (hq + hkv) * head_dim :].clone()
    positions = torch.randint(0, 131072, (tokens,), generator=gen, device=DEVICE)
    want_q, want_k = torch_rope.apply_rotary(q, k, emb(positions))
    ref_q, ref_k = apply_rotary_ref(q, k, positions, emb.inv_freq, emb.attention_scaling)
    got_q, got_k = apply_rotary(q, k, positions, emb.inv_freq, emb.attention_scaling)
    # float32: hardware cos/sin of the reduced angle, ~5e-7 absolute, times |q| of a few units.
    for got, want in ((got_q, want_q), (got_k, want_k), (got_q, ref_q), (got_k, ref_k)):
        _assert_matches(got, want, f32_tol=1e-5)
    assert torch.equal(qkv[:, (hq + hkv) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 14336), (77, 14336), (4096, 1536), (3, 4864)])
def test_silu_and_mul(dtype, tokens, inter):
    gen = _gen(tokens + inter)
    x = _randn(tokens, 2 * inter, dtype=dtype, gen=gen, scale=4.0)
    out = torch.full((tokens, inter), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x, out=out)
    _assert_matches(out, silu_and_mul_ref(x))


# ----------------------------------------------------------------------------- KV store, CUDA graphs


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_store_kv_bfloat16_cache(src_dtype):
    gen = _gen(5)
    num_pages, page_size, heads, dim, tokens = 64, 16, 8, 128, 300
    qkv = _randn(tokens, (32 + 16) * dim, dtype=src_dtype, gen=gen)
    k = qkv[:, 32 * dim : 40 * dim].view(tokens, heads, dim)
    v = qkv[:, 40 * dim :].view(tokens, heads, dim)
    slots = torch.randperm(num_pages * page_size, generator=gen, device=DEVICE)[:tokens]
    k_cache = torch.full(
        (num_pages, page_size, heads, dim), float("nan"), dtype=torch.bfloat16, device=DEVICE
    )
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(k_cache, v_cache, slots, k, v)
    store_kv_ref(k_ref, v_ref, slots, k, v)
    assert torch.equal(_bits(k_cache), _bits(k_ref)) and torch.equal(_bits(v_cache), _bits(v_ref))


def test_pool_store_on_cuda_equals_cpu_pool():
    shape = KVPoolShape(num_layers=4, num_pages=30, page_size=16, num_kv_heads=8, head_dim=128)
    gpu_pool, cpu_pool = PagedKVPool(shape, torch.bfloat16, DEVICE), PagedKVPool(shape, torch.bfloat16, "cpu")
    gen = _gen(6)
    for layer in (3, 0, 1):
        k, v = (_randn(200, 8, 128, dtype=torch.bfloat16, gen=gen) for _ in range(2))
        slots = torch.randperm(30 * 16, generator=gen, device=DEVICE)[:200]
        gpu_pool.store(layer, slots, k, v)
        cpu_pool.store(layer, slots.cpu(), k.cpu(), v.cpu())
    assert torch.equal(_bits(gpu_pool.kv.cpu()), _bits(cpu_pool.kv))


def test_kernels_replay_from_a_cuda_graph():
    """Grids from shapes only, no host syncs: a captured step gives the eager results on new inputs."""
    dtype, tokens, hidden, inter, hq, hkv, dim = torch.bfloat16, 24, 1024, 2816, 8, 2, 128
    gen = _gen(7)
    weight = _randn(hidden, dtype=dtype, gen=gen)
    inv_freq, scaling = LLAMA31_ROPE.inv_freq_and_scaling()
    inv_freq = inv_freq.to(DEVICE)

    def random_inputs() -> dict[str, torch.Tensor]:
        return {
            "x": _randn(tokens, hidden, dtype=dtype, gen=gen),
            "res": _randn(tokens, hidden, dtype=dtype, gen=gen),
            "qkv": _randn(tokens, (hq + 2 * hkv) * dim, dtype=dtype, gen=gen),
            "gate_up": _randn(tokens, 2 * inter, dtype=dtype, gen=gen),
            "pos": torch.randint(0, 100000, (tokens,), generator=gen, device=DEVICE),
            "slots": torch.randperm(32 * 16, generator=gen, device=DEVICE)[:tokens],
        }

    static = random_inputs()
    k_cache = torch.zeros(32, 16, hkv, dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)

    def step(t: dict[str, torch.Tensor]):
        normed = rmsnorm(t["x"], weight, 1e-5)
        fused, summed = fused_add_rmsnorm(t["x"], t["res"], weight, 1e-5)
        q = t["qkv"][:, : hq * dim].view(tokens, hq, dim)
        k = t["qkv"][:, hq * dim : (hq + hkv) * dim].view(tokens, hkv, dim)
        v = t["qkv"][:, (hq + hkv) * dim :].view(tokens, hkv, dim)
        apply_rotary(q, k, t["pos"], inv_freq, scaling)
        store_kv(k_cache, v_cache, t["slots"], k, v)
        return normed, fused, summed, silu_and_mul(t["gate_up"])

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step({name: t.clone() for name, t in static.items()})  # compiles every kernel outside the capture
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static)
    fresh = random_inputs()
    eager_inputs = {name: t.clone() for name, t in fresh.items()}
    for name, t in fresh.items():
        static[name].copy_(t)
    k_cache.zero_()  # the warm-up step stored its K/V too: only the replay's writes may be compared
    v_cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    graph_k, graph_v = k_cache.clone(), v_cache.clone()
    k_cache.zero_()
    v_cache.zero_()
    eager = step(eager_inputs)
    for got, want in zip(outs, eager):
        assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(static["qkv"]), _bits(eager_inputs["qkv"]))  # rope wrote q/k in place
    assert torch.equal(_bits(graph_k), _bits(k_cache)) and torch.equal(_bits(graph_v), _bits(v_cache))


# ----------------------------------------------------------------------------- staging on an 8B pool


def _random_pool(seed: int) -> PagedKVPool:
    pool = PagedKVPool(SHAPE_8B, torch.bfloat16, DEVICE)
    bits = torch.randint(
        -(2**15), 2**15, pool.kv.shape, generator=_gen(seed), device=DEVICE, dtype=torch.int16
    )
    _bits(pool.kv).copy_(bits)  # every pattern: NaN payloads, infinities, subnormals, -0
    return pool


PAGES = [37, 2, 19, 5, 30, 11, 1, 24, 8, 33, 14, 27, 3]
SPECS = [(0, 32), (7, 20), (31, 32)]


@pytest.mark.parametrize("layers", SPECS)
@pytest.mark.parametrize("to_host", [False, True])
def test_gather_pages_bit_exact_bf16(layers, to_host):
    pool = _random_pool(seed=11)
    layout = KVLayout.of(pool)
    spec = MessageSpec(first_page=0, num_pages=len(PAGES), layer_begin=layers[0], layer_end=layers[1])
    want = gather_kv_pages_ref(pool.kv, torch.tensor(PAGES, device=DEVICE), *layers)
    if to_host:
        staging = HostStagingPool(spec.nbytes(layout), max_slabs=1, pin=True)
        slab = staging.acquire(spec.nbytes(layout))
        out = typed_view(slab.buffer, layout, spec)
    else:
        out = torch.empty(spec.shape(layout), dtype=torch.bfloat16, device=DEVICE)
    out.fill_(float("nan"))
    stream, ready = torch.cuda.Stream(), torch.cuda.Event()
    ready.record()  # the caller's forward pass that produced the pages
    gather_pages(pool, PAGES, spec, out, stream, ready)
    assert torch.equal(_bits(out.cpu()), _bits(want.cpu()))
    # Same bytes as the CPU pool path (per-layer index_select).
    cpu_pool = PagedKVPool(SHAPE_8B, torch.bfloat16, "cpu")
    cpu_pool.kv.copy_(pool.kv.cpu())
    cpu_out = torch.empty(spec.shape(layout), dtype=torch.bfloat16)
    gather_pages(cpu_pool, PAGES, spec, cpu_out)
    assert torch.equal(_bits(out.cpu()), _bits(cpu_out))


@pytest.mark.parametrize("layers", SPECS)
@pytest.mark.parametrize("from_host", [False, True])
def test_scatter_pages_bit_exact_bf16(layers, from_host):
    pool, ref = _random_pool(seed=12), _random_pool(seed=12)
    layout = KVLayout.of(pool)
    spec = MessageSpec(first_page=0, num_pages=len(PAGES), layer_begin=layers[0], layer_end=layers[1])
    src_bits = torch.randint(
        -(2**15), 2**15, spec.shape(layout), generator=_gen(13), device=DEVICE, dtype=torch.int16
    )
    src = src_bits.view(torch.bfloat16)
    if from_host:
        staging = HostStagingPool(spec.nbytes(layout), max_slabs=1, pin=True)
        slab = staging.acquire(spec.nbytes(layout))
        host = typed_view(slab.buffer, layout, spec)
        host.copy_(src.cpu())
        src = host
    torch.cuda.synchronize()  # src was written on the default stream; callers hand over finished data
    scatter_pages(pool, PAGES, spec, src, torch.cuda.Stream())
    scatter_kv_pages_ref(ref.kv, torch.tensor(PAGES, device=DEVICE), *layers, src_bits.view(torch.bfloat16))
    assert torch.equal(_bits(pool.kv), _bits(ref.kv))  # pages written, everything else as it was


# ----------------------------------------------------------------------------- the pass on a model


@torch.no_grad()
def _forward(model, config: ModelConfig, ids: list[int]) -> torch.Tensor:
    shape = KVPoolShape(config.num_layers, 16, 4, config.num_kv_heads, config.head_dim)
    pool = PagedKVPool(shape, config.dtype, DEVICE)
    batch = ForwardBatch.build(
        ForwardMode.EXTEND,
        ids,
        [0],
        [len(ids)],
        [[3, 9, 1, 12, 5, 7, 2]],
        4,
        pool,
        TorchRefAttention(),
        device=DEVICE,
    )
    return model(batch)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fast_path_on_cuda_equals_plain_model(kind: str, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model_dir = make_tiny_model(kind, tmp_path)
    config = ModelConfig.from_path(model_dir)
    plain = load_model(config, model_dir, device=DEVICE)
    fast = load_model(config, model_dir, device=DEVICE)
    assert use_triton_kernels(fast) > 0
    ids = torch.randint(0, 500, (25,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(_forward(fast, config, ids), _forward(plain, config, ids), rtol=0, atol=1e-4)
