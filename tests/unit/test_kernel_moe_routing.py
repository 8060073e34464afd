"""kernels.moe_routing (Triton interpreter) against moe_routing_ref: ids exactly, weights within
float32 rounding, over expert counts 4 to 256, top-k 1 to 8 (3 and 6 too), 1 to 64 tokens,
renormalised or not, float32/float16/bfloat16 logits and each rounding of the weights; the tie
rule (equal logits go to the lower expert id), NaN rows, strided logits, the reference against
today's select_experts, and the custom op's checks.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.custom_ops import moe_routing_op
from pdserve.kernels.fused_moe import select_experts
from pdserve.kernels.moe_routing import moe_routing, moe_routing_ref

EXPERTS = (4, 8, 60, 64, 256)
TOP_KS = (1, 2, 4, 8)
# (logits dtype, renormalize, tokens, round_to): each (E, k) runs all six, every dtype both ways
CASES = (
    (torch.float32, False, 64, None),
    (torch.float32, True, 1, torch.bfloat16),
    (torch.float16, False, 5, torch.float16),
    (torch.float16, True, 5, None),
    (torch.bfloat16, False, 1, torch.bfloat16),
    (torch.bfloat16, True, 5, torch.bfloat16),
)


def _assert_same(got, want) -> None:
    (w, ids), (want_w, want_ids) = got, want
    assert ids.dtype == want_ids.dtype == torch.int32 and ids.is_contiguous()
    assert torch.equal(ids, want_ids), (ids, want_ids)
    assert w.dtype == want_w.dtype and w.shape == ids.shape
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-7)


# and top-k of no power of two (DeepSeek's 6): the kernel pads its k lanes and stores k
@pytest.mark.parametrize(
    "experts,top_k", [(e, k) for e in EXPERTS for k in TOP_KS if k <= e] + [(8, 3), (64, 6)]
)
def test_matches_ref(experts, top_k):
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    for dtype, renormalize, tokens, round_to in CASES:
        logits = (2 * torch.randn(tokens, experts, generator=gen)).to(dtype)  # 16-bit: some ties
        want = moe_routing_ref(logits, top_k, renormalize, round_to=round_to)
        _assert_same(moe_routing(logits, top_k, renormalize, round_to=round_to), want)
        if round_to is not None:  # the rounded values exactly: both round to nearest even
            assert torch.equal(want[0], want[0].to(round_to).float())


def test_ties_go_to_the_lower_expert_id():
    logits = torch.tensor(
        [[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [0.0] * 6, [5.0, 1.0, 5.0, 5.0, 1.0, 1.0]], dtype=torch.float16
    )
    weights, ids = moe_routing(logits, 4, renormalize=True)
    assert ids.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [0, 2, 3, 1]]
    _assert_same((weights, ids), moe_routing_ref(logits, 4, renormalize=True))
    torch.testing.assert_close(weights[1], torch.full((4,), 0.25))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the all-NaN row's softmax
def test_nan_rows_still_name_real_experts():
    logits = torch.randn(3, 60)
    logits[1, 7] = float("nan")
    logits[2] = float("nan")
    _, ids = moe_routing(logits, 4, renormalize=False)
    assert ((ids >= 0) & (ids < 60)).all() and 7 not in ids[1].tolist()
    assert ids[2].tolist() == [0, 1, 2, 3]
    assert torch.equal(ids, moe_routing_ref(logits, 4, renormalize=False)[1])


def test_strided_logits_and_weights_dtype():
    """The router's columns of a merged [T, E + 1] GEMM output, read in place; float16 weights out
    (bfloat16 too on a GPU: the interpreter's bfloat16 store truncates)."""
    merged = torch.randn(7, 61, dtype=torch.float16)
    got = moe_routing(merged[:, :60], 4, True, weights_dtype=torch.float16)
    want_weights, want_ids = moe_routing_ref(merged[:, :60].contiguous(), 4, True)
    assert torch.equal(got[1], want_ids) and got[0].dtype == torch.float16
    assert torch.equal(got[0], want_weights.to(torch.float16))


@pytest.mark.parametrize("renormalize", [False, True])
def test_ref_equals_select_experts_without_ties(renormalize):
    """The reference is today's select_experts arithmetic: equal values, equal ids where no ties."""
    logits = torch.randn(33, 60, generator=torch.Generator().manual_seed(4))
    weights, ids = moe_routing_ref(logits, 4, renormalize)
    want_weights, want_ids = select_experts(logits, 4, renormalize)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    rounded = moe_routing_ref(logits, 4, renormalize, round_to=torch.bfloat16)[0]
    assert torch.equal(rounded, want_weights.to(torch.bfloat16).float())


def test_custom_op_and_checks():
    logits = torch.randn(5, 61)[:, :60]
    weights, ids = moe_routing_op(logits, 4, False, torch.bfloat16)
    _assert_same((weights, ids), moe_routing_ref(logits, 4, False, round_to=torch.bfloat16))
    results = torch.library.opcheck(moe_routing_op, (logits, 4, False, torch.bfloat16))
    assert set(results.values()) == {"SUCCESS"}, results
    empty_w, empty_ids = moe_routing(torch.empty(0, 8), 2, True)
    assert empty_w.shape == empty_ids.shape == (0, 2)
    for bad in ((torch.randn(2, 8), 9), (torch.randn(2, 300), 2), (torch.randn(2, 16), 0)):
        with pytest.raises(AssertionError):
            moe_routing(*bad, renormalize=False)
    with pytest.raises(AssertionError):
        moe_routing(torch.randn(2, 8).double(), 2, False)
