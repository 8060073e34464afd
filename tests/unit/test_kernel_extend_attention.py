"""extend_attention (Triton, run by the interpreter on CPU) against extend_attention_ref, and the
reference against the engine's dense_causal_attention.

Every case is built to catch out-of-bounds or unwritten reads: pages are a random permutation
of ids that skips page 0, every pool slot outside a sequence (page 0, the unused tail of a last
page, spare pages) holds NaN, and the output is NaN before the kernel runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.shared.engine.attention_ref import dense_causal_attention
from tests.helpers.paged_kv import random_paged_kv

# (extend_len, prefix_len): one-token prompt, chunks after prefixes not aligned to any block, an
# idle request (extend 0), a chunk crossing two 16-key blocks after a 31-token prefix
REQUESTS = [(1, 0), (15, 5), (17, 31), (0, 7), (33, 0), (33, 31)]


@dataclass
class Case:
    q: torch.Tensor  # [T + 1, Hq, D]; the last row belongs to no request
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    extend_start_loc: torch.Tensor
    keys: list[torch.Tensor]  # each request's K [seq_len, Hkv, D], contiguous
    values: list[torch.Tensor]

    @property
    def max_extend_len(self) -> int:
        return int(self.extend_lens.max())

    @property
    def num_owned_rows(self) -> int:
        return int(self.extend_lens.sum())


def make_case(
    requests: list[tuple[int, int]], page_size: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [e + p for e, p in requests]
    kv = random_paged_kv(seq_lens, page_size, hkv, d, dtype, gen)
    extend_lens = [e for e, _ in requests]
    starts = [sum(extend_lens[:i]) for i in range(len(requests))]
    q = torch.randn(sum(extend_lens) + 1, hq, d, generator=gen).to(dtype)
    return Case(
        q,
        kv.k_pages,
        kv.v_pages,
        kv.page_table,
        torch.tensor(seq_lens),
        torch.tensor(extend_lens),
        torch.tensor(starts),
        kv.keys,
        kv.values,
    )


def run_kernel(case: Case, scale: float, **blocks) -> torch.Tensor:
    out = torch.full_like(case.q, math.nan)
    got = extend_attention(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, case.extend_lens,
        case.extend_start_loc, case.max_extend_len, scale, out, **blocks,
    )  # fmt: skip
    assert got is out
    return out


def reference(case: Case, scale: float) -> torch.Tensor:
    """The oracle over the same values in float32 (no rounding of its own output)."""
    return extend_attention_ref(
        case.q.float(), case.k_pages.float(), case.v_pages.float(), case.page_table,
        case.seq_lens, case.extend_lens, case.extend_start_loc, scale,
    )  # fmt: skip


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}


def check(case: Case, out: torch.Tensor, scale: float) -> None:
    rows = case.num_owned_rows
    torch.testing.assert_close(out[:rows].float(), reference(case, scale)[:rows], **tolerance(out.dtype))
    assert out[rows:].isnan().all(), "the kernel wrote a row that belongs to no request"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_matches_reference_with_small_tiles(dtype, d, hq, hkv, page_size):
    # 16 x 16 tiles: 33-token chunks span three query blocks and prefixes end mid key block
    case = make_case(REQUESTS, page_size, hq, hkv, d, dtype, seed=d + hq + page_size)
    scale = d**-0.5
    check(case, run_kernel(case, scale, block_m=16, block_n=16), scale)


@pytest.mark.parametrize(
    "d,page_size,dtype",
    [(96, 16, torch.float16), (128, 64, torch.float32), (64, 16, torch.float16), (8, 16, torch.float32)],
)
def test_matches_reference_with_default_tiles(d, page_size, dtype):
    case = make_case(REQUESTS, page_size, 4, 1, d, dtype, seed=d)
    scale = 0.7 / math.sqrt(d)
    check(case, run_kernel(case, scale), scale)


def test_uneven_query_and_key_tiles():
    # BLOCK_M 32 over BLOCK_N 16: the diagonal region spans several key blocks per query block
    case = make_case([(40, 3), (7, 50), (32, 0)], 16, 4, 2, 64, torch.float32, seed=5)
    check(case, run_kernel(case, 0.125, block_m=32, block_n=16), 0.125)
    check(case, run_kernel(case, 0.125, block_m=16, block_n=32), 0.125)


def test_strided_q_from_a_fused_projection():
    # the model splits q out of one qkv projection: q rows are strided, not contiguous
    case = make_case([(17, 5), (9, 0)], 16, 4, 2, 64, torch.float32, seed=9)
    qkv = torch.randn(case.q.shape[0], 8, 64)
    qkv[:, :4] = case.q
    strided = qkv[:, :4]
    assert not strided.is_contiguous()
    out = torch.full_like(case.q, math.nan)
    extend_attention(
        strided, case.k_pages, case.v_pages, case.page_table, case.seq_lens, case.extend_lens,
        case.extend_start_loc, case.max_extend_len, 0.125, out, block_m=16, block_n=16,
    )  # fmt: skip
    check(case, out, 0.125)


def test_no_extend_tokens_writes_nothing():
    case = make_case([(0, 5), (0, 17)], 16, 2, 2, 64, torch.float32, seed=1)
    out = run_kernel(case, 0.125)
    assert out.isnan().all()


def test_launcher_rejects_what_it_cannot_handle():
    case = make_case([(5, 3)], 16, 4, 2, 64, torch.float32, seed=2)
    args = (
        case.k_pages,
        case.v_pages,
        case.page_table,
        case.seq_lens,
        case.extend_lens,
        case.extend_start_loc,
        5,
    )
    with pytest.raises(AssertionError, match="int32"):
        extend_attention(case.q, *args[:2], case.page_table.long(), *args[3:], 0.1)
    with pytest.raises(AssertionError, match="differ"):
        extend_attention(case.q.half(), *args, 0.1)
    with pytest.raises(AssertionError, match="multiple"):
        extend_attention(case.q[:, :3], *args, 0.1)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
def test_reference_agrees_with_the_engine_backend(page_size, hq, hkv):
    case = make_case(REQUESTS, page_size, hq, hkv, 80, torch.float32, seed=3)
    scale = 80**-0.5
    ref = reference(case, scale)
    for i, (extend, prefix) in enumerate(REQUESTS):
        if extend == 0:
            continue
        start = int(case.extend_start_loc[i])
        rows = slice(start, start + extend)
        positions = torch.arange(prefix, prefix + extend)
        dense = dense_causal_attention(case.q[rows], case.keys[i], case.values[i], positions, scale)
        torch.testing.assert_close(ref[rows], dense, rtol=1e-5, atol=1e-6)
