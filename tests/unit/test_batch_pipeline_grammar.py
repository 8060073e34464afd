"""Constrained requests under overlap scheduling, over a real scheduler with the stand-in device.

The stand-in device (tests/helpers/fake_decode_device.py) asserts that a constrained row is sampled
only once its matcher has accepted every token before, so an overlapped run that sampled on a stale
mask fails there. Overlapped runs must give every request the in-order tokens (grammars that end
mid-batch, stop tokens, aborts, a tight pool), constrained decode steps must stay in flight, and a
constrained step's forward must be launched before the previous step's tokens are read. With
jump-forward on, constrained steps are read right after their launch.
"""

from __future__ import annotations

from pdserve.shared.engine.request import Req
from tests.helpers.fake_decode_device import END, FakeDevice, outputs, workload


class NoJump:
    """A jumper whose grammars never force anything: only its presence matters here."""

    def jump(self, req: Req, limit: int) -> int:
        return 0


def constrained_steps_overlapped(device: FakeDevice) -> list[int]:
    """Constrained steps whose forward was launched before the step before them was read, and whose
    sampling came after that read."""
    at = {(what, step): i for i, (what, step, _) in enumerate(device.events)}
    return [
        step
        for what, step, constrained in device.events
        if what == "forward"
        and constrained
        and ("collect", step - 1) in at
        and at["forward", step] < at["collect", step - 1] < at["sample", step]
    ]


def test_constrained_and_free_requests_match_in_order():
    spec = workload(0, 12, constrained=True)
    ref, _, ref_device = outputs(False, spec)
    got, p, device = outputs(True, spec)
    assert got == ref
    ended = [rid for rid, (ids, reason) in got.items() if reason == {"type": "stop", "matched": END}]
    assert ended, "some grammar was meant to end mid-batch"
    assert p.num_overlapped_steps > 0 and constrained_steps_overlapped(device)
    stopped_by_token = sum(1 for _, reason in ref.values() if reason["type"] == "stop")
    assert (
        ref_device.num_decode_rows <= device.num_decode_rows <= ref_device.num_decode_rows + stopped_by_token
    )


def test_a_constrained_step_launches_before_the_previous_tokens_are_read():
    spec = [("json", [5, 6, 7], 30, (), 12), ("free", [8, 9], 30)]
    ref, _, _ = outputs(False, spec)
    got, _, device = outputs(True, spec)
    assert got == ref and got["json"][1] == {"type": "stop", "matched": END}
    assert len(got["json"][0]) == 13 and len(got["free"][0]) == 30
    # every decode step of the grammar's life after its first overlaps, and so do the free ones after it
    assert len(constrained_steps_overlapped(device)) >= 10
    ref_order = outputs(False, spec)[2].events
    assert not constrained_steps_overlapped(FakeDevice(events=ref_order))


def test_grammar_ending_on_the_token_in_flight_drops_one_token():
    spec = [("short", [1, 2, 3], 30, (), 3), ("long", [4, 5], 30, (), 25), ("free", [6], 30)]
    ref, _, ref_device = outputs(False, spec)
    got, _, device = outputs(True, spec)
    assert got == ref
    assert got["short"] == (ref["short"][0], {"type": "stop", "matched": END}) and len(got["short"][0]) == 4
    assert device.num_decode_rows == ref_device.num_decode_rows + 2  # one dropped row per ended grammar
    assert not any(device.unread.values())


def test_abort_of_a_constrained_request_in_flight():
    spec = [("aborted", [9, 8, 7], 30, (), 25), ("json", [1, 2], 30, (), 20), ("free", [3], 30)]
    ref, _, _ = outputs(False, spec)
    got, _, _ = outputs(True, spec, abort_at={"aborted": 5})
    assert got["json"] == ref["json"] and got["free"] == ref["free"]
    ids, reason = got["aborted"]
    assert reason["type"] == "abort" and 5 <= len(ids) < 26 and ids == ref["aborted"][0][: len(ids)]


def test_jump_forward_keeps_constrained_steps_read_before_planning():
    spec = workload(3, 8, constrained=True)
    ref, _, _ = outputs(False, spec, jumper=NoJump())
    got, _, device = outputs(True, spec, jumper=NoJump())
    assert got == ref
    assert not constrained_steps_overlapped(device)
    at = {(what, step): i for i, (what, step, _) in enumerate(device.events)}
    for what, step, constrained in device.events:
        if what == "forward" and constrained and ("forward", step + 1) in at:
            assert at["collect", step] < at["forward", step + 1]
