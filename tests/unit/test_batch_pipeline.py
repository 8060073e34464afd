"""The batch pipeline over a real scheduler and KV cache manager, with a stand-in device.

The stand-in device (tests/helpers/fake_decode_device.py) checks that a decode step planned ahead
computes exactly the position after the tokens it holds unread. Overlapped runs must give every request the
tokens an in-order run gives, whatever stops, pool pressure and aborts happen, and every page must
come back; requests finished one step late must cost only a dropped token.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.shared.engine.request import Req
from tests.helpers.fake_decode_device import make, next_token, outputs, req, run, workload


def test_overlap_gives_the_in_order_tokens_and_keeps_steps_in_flight():
    spec = workload(0, 12)
    ref, _, ref_device = outputs(False, spec, 400)
    got, p, device = outputs(True, spec, 400)
    assert got == ref
    assert p.num_overlapped_steps > 0
    # extra rows only for requests stopped by a token read one step late (stop tokens)
    stopped_by_token = sum(1 for ids, reason in ref.values() if reason["type"] == "stop")
    assert (
        ref_device.num_decode_rows <= device.num_decode_rows <= ref_device.num_decode_rows + stopped_by_token
    )


def test_a_request_at_max_new_tokens_sits_out_the_step_planned_ahead():
    spec = [("long", [5, 6, 7], 20, ()), ("short", [8, 9], 3, ())]
    ref, _, ref_device = outputs(False, spec, 100)
    got, p, device = outputs(True, spec, 100)
    assert got == ref and p.num_overlapped_steps > 0
    assert device.num_decode_rows == ref_device.num_decode_rows  # nothing computed to be dropped


def test_stop_token_read_late_drops_one_token_and_frees_the_pages():
    first = [3, 1, 4, 1, 5]
    seq = list(first)
    for _ in range(6):
        seq.append(next_token(seq))
    stop = seq[len(first) + 3]  # the 4th generated token
    spec = [("stops", first, 30, (stop,)), ("goes_on", [2, 7, 1, 8], 30, ())]
    ref, _, _ = outputs(False, spec, 100)
    got, _, device = outputs(True, spec, 100)
    assert got == ref
    assert got["stops"][1] == {"type": "stop", "matched": stop} and got["goes_on"][1]["type"] == "length"
    assert not any(device.unread.values())


def test_max_new_tokens_one_and_an_abort_in_flight():
    spec = [("one", [4, 4, 4], 1, ()), ("aborted", [9, 8, 7, 6], 30, ()), ("rest", [1, 2, 3], 30, ())]
    ref, _, _ = outputs(False, spec, 100)
    got, _, _ = outputs(True, spec, 100, abort_at={"aborted": 5})
    assert got["one"] == ref["one"] and len(got["one"][0]) == 1
    assert got["rest"] == ref["rest"]
    ids, reason = got["aborted"]
    assert reason["type"] == "abort" and 5 <= len(ids) < 30 and ids == ref["aborted"][0][: len(ids)]


def test_a_tight_pool_retracts_only_after_reading_the_tokens_in_flight():
    spec = workload(1, 10)
    ref, ref_p, _ = outputs(False, spec, 32)
    got, p, _ = outputs(True, spec, 32)
    assert ref_p.scheduler.num_retractions > 0 and p.scheduler.num_retractions > 0
    assert got == ref


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 10),
    # below ~40 pages chunked prefill can wedge with every request half-prefilled and nothing
    # running (the scheduler retracts only for decode): an in-order limitation, not overlap's
    num_pages=st.integers(40, 120),
    abort_after=st.one_of(st.none(), st.integers(0, 12)),
    constrained=st.booleans(),  # half the requests under a stand-in grammar
)
def test_overlap_matches_in_order_on_random_workloads(seed, n, num_pages, abort_after, constrained):
    spec = workload(seed, n, constrained)
    abort_at = {"r0": abort_after} if abort_after is not None else None
    ref, _, _ = outputs(False, spec, num_pages)
    got, _, _ = outputs(True, spec, num_pages, abort_at)
    for rid, (ids, reason) in got.items():
        if reason["type"] == "abort":
            assert rid == "r0" and ids == ref[rid][0][: len(ids)]
        else:
            assert (ids, reason) == ref[rid], rid


def test_no_request_is_retracted_with_a_token_in_flight():
    """Retraction waits until the tokens in flight are read (so it decides as without overlap)."""
    p, _ = make(32, True)
    retract = p.scheduler._retract
    retracted: list[Req] = []

    def checked_retract(r: Req) -> None:
        assert not any(x.tokens_in_flight for x in p.scheduler.running), "retracting before the read"
        retracted.append(r)
        retract(r)

    p.scheduler._retract = checked_retract  # type: ignore[method-assign]
    run(p, [req(*s) for s in workload(1, 10)])
    assert retracted and p.num_overlapped_steps > 0
