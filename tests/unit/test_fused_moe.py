"""kernels.fused_moe against its torch oracle (Triton interpreter), the oracle against a dense
computation of every expert, the pair sort's invariants and select_experts by hand.

The kernel rounds where fused_moe_ref rounds, so only float32 summation order separates them:
float32 agrees to ~1e-6, float16 within one ulp and mostly bit-equal. Hidden and intermediate sizes are not
multiples of the 16-wide test tiles, so every masked edge (rows, columns, the K loop) is crossed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.custom_ops import fused_moe_op
from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref, moe_block_config, select_experts
from pdserve.kernels.moe_align import align_pairs_to_experts_ref, max_padded_rows
from tests.helpers.moe_routing import random_routing

HIDDEN, INTER = 40, 24
TILES = (16, 16, 16)


def _experts(num_experts: int, dtype: torch.dtype, seed: int, hidden: int = HIDDEN, inter: int = INTER):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return w13.to(dtype), w2.to(dtype), gen


def _assert_matches_ref(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not got.isnan().any()
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # one float16 ulp
    # a flipped rounding of one gate/up value (GEMM summation order) nudges its token's whole row
    assert (got != want).sum().item() <= 0.05 * got.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "num_experts,top_k,tokens",
    [(3, 2, 1), (5, 1, 29), (8, 8, 9), (60, 4, 24), (8, 2, 0), (3, 8, 5)],
)
def test_kernel_matches_ref(num_experts, top_k, tokens, dtype):
    """Awkward expert counts, top-k 1/2/8, T = 0, 1 and dozens, random ids with repeats (60 experts
    over 96 pairs leaves many with no token)."""
    w13, w2, gen = _experts(num_experts, dtype, seed=num_experts * 100 + top_k * 10 + tokens)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    weights, ids = random_routing(tokens, top_k, 0, num_experts, gen)
    got = fused_moe(x, w13, w2, weights, ids, block_sizes=TILES)
    _assert_matches_ref(got, fused_moe_ref(x, w13, w2, weights, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_default_tiles_and_int64_ids(dtype):
    """The launcher's own block table (tiles wider than the sizes) and int64 ids, as torch.topk gives."""
    w13, w2, gen = _experts(6, dtype, seed=7, hidden=72, inter=40)
    x = torch.randn(11, 72, generator=gen).to(dtype)
    weights, ids = random_routing(11, 3, 0, 6, gen)
    got = fused_moe(x, w13, w2, weights, ids.long())
    _assert_matches_ref(got, fused_moe_ref(x, w13, w2, weights, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shard_drops_other_experts(dtype):
    """Experts 4..6 of 12: ids of other shards and -1 add nothing; tokens with no local expert are 0."""
    offset, local = 4, 3
    w13, w2, gen = _experts(local, dtype, seed=11)
    tokens = 20
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    weights, ids = random_routing(tokens, 2, -1, 12, gen)
    ids[:3] = torch.tensor([[0, 11], [-1, 3], [9, 9]], dtype=torch.int32)  # all off-shard
    ids[3] = torch.tensor([5, 5], dtype=torch.int32)  # one expert twice
    got = fused_moe(x, w13, w2, weights, ids, expert_offset=offset, block_sizes=TILES)
    want = fused_moe_ref(x, w13, w2, weights, ids, expert_offset=offset)
    _assert_matches_ref(got, want)
    off_shard = ((ids < offset) | (ids >= offset + local)).all(dim=1)
    assert off_shard[:3].all() and (got[off_shard] == 0).all()
    assert (got[~off_shard].abs().sum(dim=1) > 0).all()


def test_shards_sum_to_the_whole():
    """Two shards' outputs add up to the unsharded layer (the sum tensor parallelism would take)."""
    w13, w2, gen = _experts(7, torch.float32, seed=3)
    x = torch.randn(13, HIDDEN, generator=gen)
    weights, ids = random_routing(13, 2, 0, 7, gen)
    whole = fused_moe(x, w13, w2, weights, ids, block_sizes=TILES)
    first = fused_moe(x, w13[:4], w2[:4], weights, ids, block_sizes=TILES)
    second = fused_moe(x, w13[4:], w2[4:], weights, ids, expert_offset=4, block_sizes=TILES)
    torch.testing.assert_close(first + second, whole, rtol=1e-5, atol=1e-5)


def test_all_tokens_on_one_expert():
    """Every pair on expert 2 of 5: one run of several blocks, the other experts get no block."""
    w13, w2, gen = _experts(5, torch.float32, seed=5)
    x = torch.randn(40, HIDDEN, generator=gen)
    weights = torch.rand(40, 1, generator=gen)
    ids = torch.full((40, 1), 2, dtype=torch.int32)
    got = fused_moe(x, w13, w2, weights, ids, block_sizes=TILES)
    _assert_matches_ref(got, fused_moe_ref(x, w13, w2, weights, ids))


def test_ref_matches_dense_experts():
    """The oracle against every expert computed for every token in float64, weighted by a dense
    [T, E] routing matrix (a repeated id adds its weights)."""
    num_experts, top_k, tokens = 5, 3, 6
    w13, w2, gen = _experts(num_experts, torch.float32, seed=17)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    weights, ids = random_routing(tokens, top_k, 0, num_experts, gen)
    ids[0] = torch.tensor([1, 1, 4], dtype=torch.int32)
    dense_weights = torch.zeros(tokens, num_experts, dtype=torch.float64)
    dense_weights.scatter_add_(1, ids.long(), weights.double())
    want = torch.zeros(tokens, HIDDEN, dtype=torch.float64)
    for e in range(num_experts):
        gate_up = x.double() @ w13[e].double().T
        y = (F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]) @ w2[e].double().T
        want += dense_weights[:, e : e + 1] * y
    got = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_invariants(block_m):
    gen = torch.Generator().manual_seed(block_m)
    num_experts, offset = 6, 2
    ids = torch.randint(-1, 10, (23, 3), generator=gen)
    blocks = align_pairs_to_experts_ref(ids, num_experts, block_m, offset)
    num_pairs = ids.numel()
    rows = blocks.sorted_pairs.numel()
    assert rows == max_padded_rows(num_pairs, num_experts, block_m) and rows % block_m == 0
    assert blocks.block_experts.shape == (rows // block_m,)
    local = ids.reshape(-1) - offset
    kept = [p for p in range(num_pairs) if 0 <= local[p] < num_experts]
    listed = [int(p) for p in blocks.sorted_pairs if p < num_pairs]
    assert sorted(listed) == kept  # every kept pair once, nothing else
    row_expert = blocks.block_experts.repeat_interleave(block_m)
    for row, pair in enumerate(blocks.sorted_pairs.tolist()):
        if pair < num_pairs:
            assert row_expert[row] == local[pair]
    # runs are in expert order, pairs ascending within one; -1 blocks only after the last run
    real = [(int(row_expert[r]), p) for r, p in enumerate(blocks.sorted_pairs.tolist()) if p < num_pairs]
    assert real == sorted(real)
    used = blocks.block_experts[blocks.block_experts >= 0]
    assert (blocks.block_experts[used.numel() :] == -1).all()
    counts = torch.bincount(local[(local >= 0) & (local < num_experts)], minlength=num_experts)
    assert used.numel() == int(((counts + block_m - 1) // block_m).sum())


def test_align_empty():
    blocks = align_pairs_to_experts_ref(torch.empty(0, 2, dtype=torch.int32), 4, 16)
    assert blocks.sorted_pairs.numel() == 0 and blocks.block_experts.numel() == 0


def test_block_table_fits_decode_and_prefill():
    assert moe_block_config(4, 60, torch.bfloat16)[0] == 16  # decode: one 16-row block per expert
    assert moe_block_config(8192 * 4, 60, torch.bfloat16)[0] == 64


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_select_experts(top_k, renormalize):
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(9, 8, generator=gen).to(torch.bfloat16)
    weights, ids = select_experts(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    exp = logits.double().exp()
    probs = exp / exp.sum(dim=1, keepdim=True)
    for t in range(logits.shape[0]):
        order = sorted(range(8), key=lambda e: -float(probs[t, e]))[:top_k]
        assert ids[t].tolist() == order
        want = probs[t, order]
        if renormalize:
            want = want / want.sum()
        torch.testing.assert_close(weights[t].double(), want, rtol=1e-6, atol=1e-6)
    if renormalize:
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(9))


def test_custom_op_matches_launcher():
    """torch.ops.pdserve.fused_moe (the op torch.compile traces) is the launcher, and its schema and
    fake implementation pass torch's op checks (fake tensors, AOT dispatch with dynamic shapes)."""
    w13, w2, gen = _experts(4, torch.float32, seed=23)
    x = torch.randn(5, HIDDEN, generator=gen)
    weights, ids = random_routing(5, 2, 0, 6, gen)
    got = fused_moe_op(x, w13, w2, weights, ids, 1)
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids, expert_offset=1))
    results = torch.library.opcheck(fused_moe_op, (x, w13, w2, weights, ids, 1))
    assert set(results.values()) == {"SUCCESS"}, results


def test_launcher_checks():
    w13, w2, gen = _experts(3, torch.float32, seed=1)
    x = torch.randn(4, HIDDEN, generator=gen)
    weights, ids = random_routing(4, 2, 0, 3, gen)
    with pytest.raises(AssertionError):
        fused_moe(x, w13, w2[:, :, :-1], weights, ids)  # w2's I differs from w13's
    with pytest.raises(AssertionError):
        fused_moe(x, w13, w2, weights.double(), ids)  # routing weights must be float32
    with pytest.raises(AssertionError):
        fused_moe(x.half(), w13, w2, weights, ids)  # dtypes differ
    with pytest.raises(AssertionError):
        fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(AssertionError):
        fused_moe(x[:3], w13, w2, weights, ids)  # one routing row per token
