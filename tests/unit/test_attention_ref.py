"""TorchRefAttention against plain dense causal attention over contiguous tensors.

The oracle here is written independently of the backend (explicit loops over heads with a
triangular mask), so a shared mistake in `dense_causal_attention` cannot hide.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.shared.engine.attention_ref import TorchRefAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a whole sequence: q [S, Hq, D], k/v [S, Hkv, D] -> [S, Hq, D] (float64)."""
    seq, num_q, _ = q.shape
    group = num_q // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    for h in range(num_q):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        scores = (q[:, h].double() @ kh.T) * scale
        scores = scores.masked_fill(~mask, -math.inf)
        out[:, h] = torch.softmax(scores, dim=-1) @ vh
    return out


class Seq:
    """One request's full q/k/v, its pages, and how much of it is already in the pool."""

    def __init__(self, length: int, prefix: int, pages: list[int], hq: int, hkv: int, d: int, gen):
        self.q = torch.randn(length, hq, d, generator=gen)
        self.k = torch.randn(length, hkv, d, generator=gen)
        self.v = torch.randn(length, hkv, d, generator=gen)
        self.length, self.prefix, self.pages = length, prefix, pages


def _run(seqs: list[Seq], page_size: int, hkv: int, d: int, dtype=torch.float32, layer: int = 1):
    scale = d**-0.5
    pool = PagedKVPool(KVPoolShape(2, 40, page_size, hkv, d), dtype, "cpu")
    backend = TorchRefAttention()
    # Put each prefix into the pool the way an earlier pass would have.
    for s in seqs:
        if s.prefix:
            slots = torch.tensor(
                [s.pages[j // page_size] * page_size + j % page_size for j in range(s.prefix)]
            )
            pool.store(layer, slots, s.k[: s.prefix], s.v[: s.prefix])
    extends = [s.length - s.prefix for s in seqs]
    mode = ForwardMode.DECODE if all(e == 1 for e in extends) else ForwardMode.EXTEND
    batch = ForwardBatch.build(
        mode,
        [0] * sum(extends),
        [s.prefix for s in seqs],
        extends,
        [s.pages for s in seqs],
        page_size,
        pool,
        backend,
    )
    q = torch.cat([s.q[s.prefix :] for s in seqs]).to(dtype)
    k = torch.cat([s.k[s.prefix :] for s in seqs]).to(dtype)
    v = torch.cat([s.v[s.prefix :] for s in seqs]).to(dtype)
    out = backend.attend(layer, q, k, v, batch, scale)
    assert out.dtype == dtype and out.shape == q.shape
    expected = torch.cat(
        [_oracle(s.q.to(dtype), s.k.to(dtype), s.v.to(dtype), scale)[s.prefix :] for s in seqs]
    )
    return out, expected, pool


@pytest.mark.parametrize(
    "length,prefix,page_size",
    [(1, 0, 4), (8, 0, 4), (13, 0, 4), (13, 5, 4), (13, 12, 4), (17, 16, 16), (31, 9, 8), (7, 0, 1)],
)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (4, 1)])
def test_single_request_matches_dense(length, prefix, page_size, hq, hkv):
    gen = torch.Generator().manual_seed(length * 100 + prefix)
    num_pages = -(-length // page_size)
    pages = [int(p) + 1 for p in torch.randperm(39, generator=gen)[:num_pages]]  # shuffled, never page 0
    s = Seq(length, prefix, pages, hq, hkv, 16, gen)
    out, expected, _ = _run([s], page_size, hkv, 16)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_batch_mixes_prefixes_lengths_and_partial_pages():
    gen = torch.Generator().manual_seed(7)
    page_size, hq, hkv, d = 4, 6, 3, 8
    seqs = [
        Seq(5, 0, [17, 3], hq, hkv, d, gen),  # fresh prompt, partial last page
        Seq(11, 6, [8, 30, 1], hq, hkv, d, gen),  # chunk after a cached prefix
        Seq(1, 0, [22], hq, hkv, d, gen),  # one-token prompt
        Seq(9, 8, [5, 12, 39], hq, hkv, d, gen),  # decode-like: one new token on a long prefix
    ]
    out, expected, pool = _run(seqs, page_size, hkv, d)
    assert (out.double() - expected).abs().max().item() < 1e-5
    # The new tokens' K/V landed in their pages (token 6 of request 1 is page 30, offset 2).
    assert torch.equal(pool.k_buffers[1][30, 2], seqs[1].k[6])
    assert torch.equal(pool.v_buffers[1][39, 0], seqs[3].v[8])


def test_decode_batch_of_many():
    gen = torch.Generator().manual_seed(3)
    lengths = [2, 9, 16, 17, 4]
    seqs, next_page = [], 1
    for n in lengths:
        pages = list(range(next_page, next_page + -(-n // 4)))[::-1]  # reversed page order
        next_page += len(pages)
        seqs.append(Seq(n, n - 1, pages, 4, 2, 16, gen))
    out, expected, _ = _run(seqs, 4, 2, 16)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_bfloat16_pool_computes_in_float32_and_casts_back():
    gen = torch.Generator().manual_seed(11)
    s = Seq(12, 5, [4, 9, 2], 4, 2, 16, gen)
    out, expected, _ = _run([s], 4, 2, 16, dtype=torch.bfloat16)
    assert (out.double() - expected).abs().max().item() < 2e-2
