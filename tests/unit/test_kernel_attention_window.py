"""Sliding windows and logit soft-capping in extend_attention and decode_attention (Triton, run by
the interpreter on CPU) against their `*_ref`s, the refs against the engine's torch backend, and
the window's edge against transformers' own mask function.

Windows are smaller than, equal to and larger than the sequences; chunks start before, at and past
the window edge of their prefix; a prompt fed in chunks equals one pass. The paged K/V and NaN
rules are those of test_kernel_extend_attention.py, whose cases these reuse.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.kernels.attention_mask import hidden_keys
from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.shared.engine.attention_ref import dense_causal_attention
from tests.unit import test_kernel_decode_attention as decode_cases
from tests.unit import test_kernel_extend_attention as extend_cases

# (extend_len, prefix_len): a prompt, chunks whose prefix ends before / across the window edge
REQUESTS = [(1, 0), (15, 5), (17, 31), (0, 7), (33, 0), (9, 40)]
WINDOWS = [1, 4, 16, 17, 33, 49, 200]  # 17 = a 16-key block and one more; 49 = the longest sequence


def _extend(case, scale: float, **kwargs) -> torch.Tensor:
    out = torch.full_like(case.q, math.nan)
    extend_attention(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, case.extend_lens,
        case.extend_start_loc, case.max_extend_len, scale, out, **kwargs,
    )  # fmt: skip
    return out


def _extend_ref(case, scale: float, **kwargs) -> torch.Tensor:
    return extend_attention_ref(
        case.q.float(), case.k_pages.float(), case.v_pages.float(), case.page_table,
        case.seq_lens, case.extend_lens, case.extend_start_loc, scale, **kwargs,
    )  # fmt: skip


def _check_extend(case, scale: float, block_m: int = 16, block_n: int = 16, **kwargs) -> None:
    out = _extend(case, scale, block_m=block_m, block_n=block_n, **kwargs)
    rows = case.num_owned_rows
    want = _extend_ref(case, scale, **kwargs)[:rows]
    torch.testing.assert_close(out[:rows].float(), want, **extend_cases.tolerance(out.dtype))
    assert out[rows:].isnan().all(), "the kernel wrote a row that belongs to no request"


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_window_matches_reference(window, page_size):
    case = extend_cases.make_case(REQUESTS, page_size, 4, 2, 32, torch.float32, seed=window + page_size)
    _check_extend(case, 32**-0.5, window=window)


@pytest.mark.parametrize("window,softcap", [(None, 0.5), (None, 30.0), (7, 2.0), (200, 50.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_softcap_matches_reference(window, softcap, dtype):
    case = extend_cases.make_case(REQUESTS, 16, 8, 2, 64, dtype, seed=3)
    # scale 1: scores of several units, so a cap of 0.5 or 2 changes them a lot
    _check_extend(case, 1.0, window=window, softcap=softcap)
    _check_extend(case, 1.0, block_m=32, block_n=16, window=window, softcap=softcap)


def test_extend_window_with_default_tiles():
    case = extend_cases.make_case([(70, 0), (40, 90), (1, 130)], 16, 4, 1, 64, torch.float16, seed=4)
    for window in (1, 50, 64, 65, 129):
        _check_extend(case, 0.125, block_m=None, block_n=None, window=window, softcap=20.0)


@pytest.mark.parametrize("window", [3, 10, 16, 40])
def test_chunked_prefill_equals_one_pass(window):
    # the same 40-token prompt in chunks of 7: each chunk reads the earlier ones from the pool
    whole = extend_cases.make_case([(40, 0)], 4, 4, 2, 32, torch.float32, seed=window)
    one_pass = _extend(whole, 0.2, window=window, block_m=16, block_n=16)
    chunks, done = [], 0
    while done < 40:
        n = min(7, 40 - done)
        q = whole.q[done : done + n].clone()
        out = torch.full_like(q, math.nan)
        extend_attention(
            q, whole.k_pages, whole.v_pages, whole.page_table, torch.tensor([done + n]),
            torch.tensor([n]), torch.tensor([0]), n, 0.2, out, window=window, block_m=16, block_n=16,
        )  # fmt: skip
        chunks.append(out)
        done += n
    torch.testing.assert_close(torch.cat(chunks), one_pass[:40], rtol=1e-5, atol=2e-5)


def _decode(case, scale: float, splits: int, **kwargs) -> torch.Tensor:
    out = torch.full_like(case.q, math.nan)
    decode_attention(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, scale, out, splits,
        block_n=16, **kwargs,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_window_matches_reference(window, splits):
    case = decode_cases.make_case(decode_cases.SEQ_LENS, 16, 8, 2, 32, torch.float32, seed=window)
    out = _decode(case, 32**-0.5, splits, window=window)
    want = decode_attention_ref(
        case.q, case.k_pages, case.v_pages, case.page_table, case.seq_lens, 32**-0.5, window=window
    )
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5)  # padding rows: 0 on both


@pytest.mark.parametrize("window,softcap", [(None, 0.5), (5, 2.0), (None, 50.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_softcap_matches_reference(window, softcap, dtype):
    case = decode_cases.make_case(decode_cases.SEQ_LENS, 1, 4, 1, 64, dtype, seed=7)
    out = _decode(case, 1.0, 4, window=window, softcap=softcap)
    want = decode_attention_ref(
        case.q.float(), case.k_pages.float(), case.v_pages.float(), case.page_table, case.seq_lens, 1.0,
        window=window, softcap=softcap,
    )  # fmt: skip
    tol = {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out.float(), want, **tol)


def test_launchers_reject_bad_windows_and_caps():
    case = decode_cases.make_case([5], 16, 4, 2, 32, torch.float32, seed=1)
    with pytest.raises(AssertionError, match="window"):
        _decode(case, 0.1, 2, window=0)
    with pytest.raises(AssertionError, match="softcap"):
        _decode(case, 0.1, 2, softcap=-1.0)


@pytest.mark.parametrize("window,softcap", [(1, None), (6, 3.0), (None, 3.0), (100, None)])
def test_references_agree_with_the_engine_backend(window, softcap):
    case = extend_cases.make_case(REQUESTS, 4, 4, 2, 16, torch.float32, seed=11)
    ref = _extend_ref(case, 0.5, window=window, softcap=softcap)
    for i, (extend, prefix) in enumerate(REQUESTS):
        if extend == 0:
            continue
        rows = slice(int(case.extend_start_loc[i]), int(case.extend_start_loc[i]) + extend)
        positions = torch.arange(prefix, prefix + extend)
        dense = dense_causal_attention(
            case.q[rows], case.keys[i], case.values[i], positions, 0.5, window=window, softcap=softcap
        )
        torch.testing.assert_close(ref[rows], dense, rtol=1e-5, atol=1e-6)
        # decode's reference for the request's last token is the extend reference's last row
        last = slice(rows.stop - 1, rows.stop)
        one = decode_attention_ref(
            case.q[last], case.k_pages, case.v_pages, case.page_table[i : i + 1],
            case.seq_lens[i : i + 1], 0.5, window=window, softcap=softcap,
        )  # fmt: skip
        torch.testing.assert_close(one, ref[last], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_window_edge_is_transformers_own(window):
    from transformers.masking_utils import sliding_window_causal_mask_function

    visible = sliding_window_causal_mask_function(window)
    positions = torch.arange(12)
    ours = ~hidden_keys(positions, positions, window)
    zero = torch.tensor(0)
    theirs = visible(zero, zero, positions[:, None], positions[None, :])
    assert torch.equal(ours, theirs)
    assert ours.sum(-1).max().item() == window  # the last `window` keys, the query's own included
