"""kernels.token_bitmask against its torch oracle and against xgrammar's own bitmask layout
(Triton interpreter). Masking writes -inf or nothing, so the results are bit-identical."""

from __future__ import annotations

import pytest
import torch

from pdserve.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref


def _random_bitmask(batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    words = -(-vocab // 32)
    raw = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=gen, dtype=torch.int64)
    mask = raw.to(torch.int32)
    mask[0] = -1  # an unconstrained row: every bit set
    return mask


@pytest.mark.parametrize("batch,vocab", [(1, 32), (3, 1000), (5, 2049), (2, 49152), (4, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_ref(batch, vocab, dtype):
    gen = torch.Generator().manual_seed(batch * 7 + vocab)
    logits = torch.randn(batch, vocab, generator=gen).to(dtype)
    bitmask = _random_bitmask(batch, vocab, gen)
    got = apply_token_bitmask(logits.clone(), bitmask)
    want = apply_token_bitmask_ref(logits.clone(), bitmask)
    assert torch.equal(got, want)
    assert torch.equal(got[0], logits[0])  # the all-ones row is untouched
    assert batch == 1 or got[1:].isinf().any()


def test_row_strided_logits_and_wider_bitmask():
    """A padded lm_head's logits sliced to the vocabulary, and a bitmask with spare words."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 130, generator=gen)
    logits = wide[:, :100]
    bitmask = _random_bitmask(3, 200, gen)
    want = apply_token_bitmask_ref(logits.clone(), bitmask)
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, want)
    assert torch.equal(
        wide[:, 100:], torch.randn(3, 130, generator=torch.Generator().manual_seed(3))[:, 100:]
    )


def test_xgrammar_layout():
    """The bit order is xgrammar's: a matcher's allowed tokens are exactly the finite logits."""
    xgr = pytest.importorskip("xgrammar")
    vocab = 300
    info = xgr.TokenizerInfo(
        [bytes([i]).decode("latin-1") for i in range(256)] + ["</s>"] * 44, stop_token_ids=[256]
    )
    grammar = xgr.GrammarCompiler(info).compile_regex("(ab|c)+")
    matcher = xgr.GrammarMatcher(grammar)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask)
    logits = apply_token_bitmask(torch.zeros(1, vocab), bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [ord("a"), ord("c")]


def test_refuses_a_narrow_bitmask():
    with pytest.raises(AssertionError):
        apply_token_bitmask(torch.zeros(1, 100), torch.zeros(1, 3, dtype=torch.int32))
