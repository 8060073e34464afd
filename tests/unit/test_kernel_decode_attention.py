"""decode_attention (Triton, run by the interpreter on CPU) against decode_attention_ref, and the
reference against the engine's dense_causal_attention.

Pages are a random permutation of ids that skips page 0; every pool slot outside a sequence
(page 0, unused tails of last pages, spare pages) holds NaN; output and workspace start as NaN.
Rows of length 0 stand for the padding rows of a CUDA-graph batch (page table all zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from pdserve.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    decode_workspace_numel,
    num_kv_splits_for,
)
from pdserve.shared.engine.attention_ref import dense_causal_attention
from tests.helpers.paged_kv import random_paged_kv

SEQ_LENS = [1, 15, 17, 0, 33, 36, 5]  # 36 = a 31-token prefix plus 5; 0 = a padding row


@dataclass
class Case:
    q: torch.Tensor  # [B, Hq, D]
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    keys: list[torch.Tensor]  # each request's K [seq_len, Hkv, D], contiguous
    values: list[torch.Tensor]


def make_case(
    seq_lens: list[int], page_size: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    kv = random_paged_kv(seq_lens, page_size, hkv, d, dtype, gen)
    q = torch.randn(len(seq_lens), hq, d, generator=gen).to(dtype)
    return Case(q, kv.k_pages, kv.v_pages, kv.page_table, torch.tensor(seq_lens), kv.keys, kv.values)


def run_kernel(case: Case, scale: float, num_kv_splits: int, **kwargs) -> torch.Tensor:
    out = torch.full_like(case.q, math.nan)
    got = decode_attention(
        case.q,
        case.k_pages,
        case.v_pages,
        case.page_table,
        case.seq_lens,
        scale,
        out,
        num_kv_splits,
        **kwargs,
    )
    assert got is out
    return out


def reference(case: Case, scale: float) -> torch.Tensor:
    """The oracle over the same values in float32 (no rounding of its own output)."""
    return decode_attention_ref(
        case.q.float(), case.k_pages.float(), case.v_pages.float(), case.page_table, case.seq_lens, scale
    )


def check(case: Case, out: torch.Tensor, scale: float) -> None:
    tol = {"rtol": 1e-5, "atol": 2e-5} if out.dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out.float(), reference(case, scale), **tol)  # padding rows: 0 on both


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_matches_reference(dtype, d, hq, hkv, page_size):
    case = make_case(SEQ_LENS, page_size, hq, hkv, d, dtype, seed=d + hq + page_size)
    # 16-key blocks and 3 splits: slices end mid-page, short sequences leave splits empty
    check(case, run_kernel(case, d**-0.5, num_kv_splits=3, block_n=16), d**-0.5)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 8, 16])
def test_any_number_of_splits(num_kv_splits):
    case = make_case(SEQ_LENS, 16, 4, 1, 64, torch.float32, seed=num_kv_splits)
    check(case, run_kernel(case, 0.125, num_kv_splits, block_n=16), 0.125)


@pytest.mark.parametrize(
    "d,page_size,dtype",
    [(96, 16, torch.float16), (128, 64, torch.float32), (80, 1, torch.float16), (8, 16, torch.float32)],
)
def test_default_tiles(d, page_size, dtype):
    case = make_case([70, 1, 0, 129], page_size, 4, 2, d, dtype, seed=d)
    check(case, run_kernel(case, 0.8 / math.sqrt(d), num_kv_splits=4), 0.8 / math.sqrt(d))


def test_padding_rows_are_finite_and_read_no_page():
    # a graph batch of padding rows only: length 0, every page-table entry page 0 (all NaN here)
    case = make_case([0, 0, 0], 16, 4, 2, 64, torch.float32, seed=4)
    out = run_kernel(case, 0.125, num_kv_splits=8)
    assert torch.equal(out, torch.zeros_like(out))


def test_preallocated_workspace_is_reused_and_larger_is_fine():
    case = make_case([9, 0, 40], 16, 8, 2, 64, torch.float32, seed=6)
    needed = decode_workspace_numel(3, 8, 64, 4)
    workspace = torch.full((needed + 100,), math.nan)
    ptr = workspace.data_ptr()
    for _ in range(2):  # a second call overwrites the first's partials, reading nothing stale
        check(case, run_kernel(case, 0.125, 4, workspace=workspace, block_n=16), 0.125)
    assert workspace.data_ptr() == ptr and workspace[needed:].isnan().all()
    with pytest.raises(AssertionError, match="workspace needs"):
        run_kernel(case, 0.125, 4, workspace=workspace[: needed - 1])


def test_strided_q_from_a_fused_projection():
    case = make_case([9, 23], 16, 4, 2, 64, torch.float32, seed=8)
    qkv = torch.randn(2, 8, 64)
    qkv[:, :4] = case.q
    out = torch.full_like(case.q, math.nan)
    decode_attention(qkv[:, :4], case.k_pages, case.v_pages, case.page_table, case.seq_lens, 0.125, out, 2)
    check(case, out, 0.125)


def test_split_count_depends_on_shapes_only():
    assert num_kv_splits_for(1, 8, 132) == 32  # one request: split wide to fill the GPU
    assert num_kv_splits_for(64, 8, 132) == 2
    assert all(num_kv_splits_for(b, 8, 132) >= num_kv_splits_for(b + 1, 8, 132) for b in range(1, 200))
    assert {num_kv_splits_for(b, h, 132) for b in range(1, 300) for h in (1, 8)} <= {2, 4, 8, 16, 32}


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1)])
def test_reference_agrees_with_the_engine_backend(page_size, hq, hkv):
    case = make_case(SEQ_LENS, page_size, hq, hkv, 80, torch.float32, seed=3)
    ref = reference(case, 80**-0.5)
    for i, seq_len in enumerate(SEQ_LENS):
        if seq_len == 0:
            assert torch.equal(ref[i], torch.zeros_like(ref[i]))
            continue
        position = torch.tensor([seq_len - 1])
        dense = dense_causal_attention(case.q[i : i + 1], case.keys[i], case.values[i], position, 80**-0.5)
        torch.testing.assert_close(ref[i : i + 1], dense, rtol=1e-5, atol=1e-6)
