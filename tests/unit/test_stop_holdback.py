"""`StopStringMatcher.visible_len` against a brute force, and its cost at the stop-string limits.

The hold-back only tries the tails that C-speed searches say can match; the property test checks
it holds back exactly the longest tail that is a proper prefix of some stop string, over small
alphabets where repetitive strings (the hard case for the search) are common.
"""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.text.stop_strings import MAX_STOP_CHARS_TOTAL, PROBE_CHARS, StopStringMatcher


def brute_visible_len(stops: list[str], text: str) -> int:
    held = max(
        (k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
        default=0,
    )
    return len(text) - held


@settings(max_examples=2000, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=3 * PROBE_CHARS), min_size=1, max_size=4),
    text=st.text(alphabet="abc", max_size=4 * PROBE_CHARS),
)
def test_visible_len_matches_brute_force(stops, text):
    m = StopStringMatcher(stops)
    assert m.visible_len(text) == brute_visible_len(m.stops, text)


def test_visible_len_is_cheap_on_repetitive_stops_at_the_limit():
    # periodic stops with a defect, and text that matches each one almost to its end: the hard case
    stops = ["ab" * 31 + "x" + str(i) for i in range(MAX_STOP_CHARS_TOTAL // 64)]
    text = "ab" * 500 + "aXb" + "ab" * 8
    m = StopStringMatcher(stops)
    assert m.visible_len(text) == brute_visible_len(m.stops, text)
    start = time.perf_counter()
    for _ in range(20):
        m.visible_len(text)
    assert (time.perf_counter() - start) / 20 < 0.02  # ~1.5 ms when idle; generous for a busy CI
