"""kernels.fused_moe with fp8 experts against fused_moe_ref's fp8 path (Triton interpreter), and that
path against a float64 computation from the dequantized weights and requantized inputs.

The kernel quantizes each input row exactly as the reference does (same scales, same e4m3
roundings: kernels.fp8_quant), multiplies the same fp8 values and scales in the same order, so
only float32 summation order separates them: float32 agrees to ~1e-6. Sizes are not multiples of
the 16-wide test tiles, so every masked edge is crossed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.custom_ops import fused_moe_fp8_op
from pdserve.kernels.fp8_quant import per_channel_quant_fp8, per_token_quant_fp8_ref
from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref
from tests.helpers.moe_routing import random_routing

HIDDEN, INTER = 40, 24
TILES = (16, 16, 16)


def _fp8_experts(num_experts: int, seed: int, hidden: int = HIDDEN, inter: int = INTER):
    """(w13, w13_scale, w2, w2_scale, generator): random experts quantized per output row."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    q13, s13 = per_channel_quant_fp8(w13.reshape(-1, hidden))
    q2, s2 = per_channel_quant_fp8(w2.reshape(-1, inter))
    return (
        q13.reshape(w13.shape),
        s13.reshape(num_experts, 2 * inter),
        q2.reshape(w2.shape),
        s2.reshape(num_experts, hidden),
        gen,
    )


def _assert_matches_ref(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one float16 ulp; a flipped gate/up rounding nudges its token's row
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_experts,top_k,tokens",
    [(3, 2, 1), (5, 1, 29), (8, 8, 9), (60, 4, 24), (8, 2, 0), (3, 8, 5)],
)
def test_fp8_kernel_matches_ref(num_experts, top_k, tokens, dtype):
    """Awkward expert counts, top-k 1/2/8, T = 0, 1 and dozens, repeated ids, experts with no token."""
    w13, s13, w2, s2, gen = _fp8_experts(num_experts, seed=num_experts * 100 + top_k * 10 + tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    weights, ids = random_routing(tokens, top_k, 0, num_experts, gen)
    got = fused_moe(x, w13, w2, weights, ids, block_sizes=TILES, w13_scale=s13, w2_scale=s2)
    _assert_matches_ref(got, fused_moe_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2))


def test_fp8_default_tiles_through_the_custom_op():
    """The launcher's own tile table (tiles wider than the sizes), int64 ids, the registered op."""
    w13, s13, w2, s2, gen = _fp8_experts(6, seed=7, hidden=72, inter=40)
    x = torch.randn(11, 72, generator=gen)
    weights, ids = random_routing(11, 3, 0, 6, gen)
    got = fused_moe_fp8_op(x, w13, s13, w2, s2, weights, ids.long(), 0)
    _assert_matches_ref(got, fused_moe_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2))


def test_fp8_shard_drops_other_experts():
    """Experts 4..6 of 12: off-shard ids and -1 add nothing; tokens with no local expert give 0."""
    offset, local, tokens = 4, 3, 20
    w13, s13, w2, s2, gen = _fp8_experts(local, seed=11)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    weights, ids = random_routing(tokens, 2, -1, 12, gen)
    ids[:3] = torch.tensor([[0, 11], [-1, 3], [9, 9]], dtype=torch.int32)
    got = fused_moe(
        x, w13, w2, weights, ids, expert_offset=offset, block_sizes=TILES, w13_scale=s13, w2_scale=s2
    )
    want = fused_moe_ref(x, w13, w2, weights, ids, expert_offset=offset, w13_scale=s13, w2_scale=s2)
    _assert_matches_ref(got, want)
    off_shard = ((ids < offset) | (ids >= offset + local)).all(dim=1)
    assert off_shard[:3].all() and (got[off_shard] == 0).all()
    assert (got[~off_shard].abs().sum(dim=1) > 0).all()


def test_fp8_ref_matches_dequantized_experts_in_float64():
    """The fp8 oracle against every token's experts in float64: inputs rounded per row to e4m3
    (the same quantizer), weights dequantized, the routing weights summed per expert."""
    num_experts, top_k, tokens = 5, 3, 6
    w13, s13, w2, s2, gen = _fp8_experts(num_experts, seed=17)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    weights, ids = random_routing(tokens, top_k, 0, num_experts, gen)
    want = torch.zeros(tokens, HIDDEN, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            q, sx = per_token_quant_fp8_ref(x[t : t + 1])
            gate, up = ((q.double() * sx.double()) @ (w13[e].double() * s13[e, :, None].double()).T).chunk(
                2, -1
            )
            act = (F.silu(gate.float()) * up.float()).float()
            qa, sa = per_token_quant_fp8_ref(act)
            down = (qa.double() * sa.double()) @ (w2[e].double() * s2[e, :, None].double()).T
            want[t] += weights[t, j].double() * down[0]
    got = fused_moe_ref(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_fp8_scales_are_checked():
    w13, s13, w2, s2, gen = _fp8_experts(3, seed=1)
    x = torch.randn(4, HIDDEN, generator=gen)
    weights, ids = random_routing(4, 2, 0, 3, gen)
    with pytest.raises(AssertionError):
        fused_moe_ref(x, w13, w2, weights, ids, w13_scale=s13)  # w2's scale missing
    with pytest.raises(AssertionError):
        fused_moe_ref(x, w13, w2, weights, ids, w13_scale=s13[:, :-1], w2_scale=s2)
