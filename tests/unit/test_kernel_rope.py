"""kernels.rope.apply_rotary against its torch oracle and the engine's RotaryEmbedding + apply_rotary
(Triton interpreter), with default, Llama 3.1 (llama3-scaled) and linear inverse frequencies.

q and k are views into one fused qkv output, rotated in place; v, between them and the next row,
must come out untouched. Positions reach 1e5 so that the angle reduction is exercised.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rope import apply_rotary, apply_rotary_ref
from pdserve.shared.models import rope as torch_rope
from pdserve.shared.models.rope import RopeConfig, RotaryEmbedding
from tests.helpers.kernel_checks import assert_matches_ref

HEAD_DIMS = [64, 80, 96, 128]
DTYPES = [torch.float32, torch.float16]


def _configs(head_dim: int) -> dict[str, RopeConfig]:
    return {
        "default": RopeConfig("default", 10000.0, head_dim),
        "llama3": RopeConfig(
            "llama3",
            500000.0,
            head_dim,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        "linear": RopeConfig("linear", 1000000.0, head_dim, factor=4.0),
    }


def _qkv(tokens: int, hq: int, hkv: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hkv) * head_dim].view(tokens, hkv, head_dim)
    return qkv, q, k


def _positions(tokens: int, gen: torch.Generator) -> torch.Tensor:
    pos = torch.randint(0, 131072, (tokens,), generator=gen)
    pos[: min(tokens, 3)] = torch.tensor([0, 1, 8191])[: min(tokens, 3)]
    return pos


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_type", ["default", "llama3", "linear"])
@pytest.mark.parametrize("heads,tokens", [((4, 2), 11), ((3, 1), 1), ((40, 8), 3)])
def test_rotary_matches_engine(head_dim, dtype, rope_type, heads, tokens):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(head_dim * 7 + tokens)
    cfg = _configs(head_dim)[rope_type]
    emb = RotaryEmbedding(cfg)
    qkv, q, k = _qkv(tokens, hq, hkv, head_dim, dtype, gen)
    v_before = qkv[:, (hq + hkv) * head_dim :].clone()
    positions = _positions(tokens, gen)
    want_q, want_k = torch_rope.apply_rotary(q, k, emb(positions))
    ref_q, ref_k = apply_rotary_ref(q, k, positions, emb.inv_freq, emb.attention_scaling)
    q_before, k_before = q.clone(), k.clone()
    got_q, got_k = apply_rotary(q, k, positions, emb.inv_freq, emb.attention_scaling)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert_matches_ref(got_q, want_q)
    assert_matches_ref(got_k, want_k)
    assert_matches_ref(got_q, ref_q)
    assert_matches_ref(got_k, ref_k)
    assert torch.equal(qkv[:, (hq + hkv) * head_dim :], v_before)
    if tokens > 1:  # rows at position > 0 really changed (position 0 is the identity)
        assert not torch.equal(got_q[1:], q_before[1:]) and not torch.equal(got_k[1:], k_before[1:])


@pytest.mark.parametrize("scaling", [1.0, 1.2])
def test_attention_scaling_and_int32_positions(scaling):
    """Yarn-style attention scaling multiplies cos and sin; int32 positions read like int64."""
    gen = torch.Generator().manual_seed(11)
    emb = RotaryEmbedding(_configs(64)["default"])
    emb.attention_scaling = scaling
    _, q, k = _qkv(6, 4, 2, 64, torch.float32, gen)
    positions = _positions(6, gen)
    want_q, want_k = torch_rope.apply_rotary(q, k, emb(positions))
    got_q, got_k = apply_rotary(q.clone(), k.clone(), positions.to(torch.int32), emb.inv_freq, scaling)
    assert_matches_ref(got_q, want_q)
    assert_matches_ref(got_k, want_k)


def test_large_angles_stay_accurate():
    """Angles up to ~1e6 radians: cos/sin of the same float32 angle as torch, not of a rounded one."""
    gen = torch.Generator().manual_seed(13)
    inv_freq = torch.linspace(1.0, 0.001, 32)
    _, q, k = _qkv(8, 2, 1, 64, torch.float32, gen)
    positions = torch.tensor([1, 1000, 65535, 131071, 500000, 999999, 77777, 3])
    want_q, want_k = apply_rotary_ref(q, k, positions, inv_freq, 1.0)
    got_q, got_k = apply_rotary(q.clone(), k.clone(), positions, inv_freq, 1.0)
    assert_matches_ref(got_q, want_q)
    assert_matches_ref(got_k, want_k)


def test_llama31_config_from_hf():
    """The inv_freq a Llama 3.1 checkpoint's config gives (llama3 scaling changes only inv_freq)."""
    from transformers import LlamaConfig

    hf = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = RopeConfig.from_hf_config(hf)
    assert cfg.rope_type == "llama3" and cfg.head_dim == 128
    emb = RotaryEmbedding(cfg)
    assert not torch.equal(emb.inv_freq, RotaryEmbedding(RopeConfig("default", 500000.0, 128)).inv_freq)
    gen = torch.Generator().manual_seed(17)
    for dtype in DTYPES:
        _, q, k = _qkv(5, 4, 1, 128, dtype, gen)
        positions = _positions(5, gen)
        want_q, want_k = torch_rope.apply_rotary(q, k, emb(positions))
        got_q, got_k = apply_rotary(q, k, positions, emb.inv_freq, emb.attention_scaling)
        assert_matches_ref(got_q, want_q)
        assert_matches_ref(got_k, want_k)


def test_launcher_rejects_what_it_does_not_handle():
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    positions, inv_freq = torch.arange(3), torch.rand(32)
    with pytest.raises(AssertionError):
        apply_rotary(q, k.half(), positions, inv_freq, 1.0)
    with pytest.raises(AssertionError):
        apply_rotary(q, k, positions, inv_freq.double(), 1.0)
    with pytest.raises(AssertionError):
        apply_rotary(q, k, positions[:2], inv_freq, 1.0)
    with pytest.raises(AssertionError):
        apply_rotary(torch.randn(3, 64, 4).transpose(1, 2), k, positions, inv_freq, 1.0)
    with pytest.raises(AssertionError):
        apply_rotary(q, k, positions.float(), inv_freq, 1.0)
