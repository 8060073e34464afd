"""Stop strings: earliest match wins, trimming, no_stop_trim, and the streaming hold-back; then
SampleTracker, which applies them to one sample's token stream (cut ids and logprobs at the stop).

The property test grows a text one character at a time (as a stream does) and checks the two
promises: the match found is the one a full search finds, and no visible prefix ever reaches
past the start of that match.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.text.stop_strings import StopMatch, StopStringMatcher


def test_first_ending_stop_wins_and_is_trimmed():
    m = StopStringMatcher(["world", "lo w"])
    text = "hello world"
    match = m.find(text, 0)
    assert match == StopMatch("lo w", 3)
    assert m.final_text(text, match) == "hel"


def test_no_stop_trim_keeps_the_stop_string():
    m = StopStringMatcher(["\n\n"], no_stop_trim=True)
    text = "a\n\nb"
    match = m.find(text, 0)
    assert m.final_text(text, match) == "a\n\n"


def test_same_end_prefers_earlier_start():
    m = StopStringMatcher(["bc", "abc"])
    assert m.find("xabc", 0) == StopMatch("abc", 1)


def test_search_starts_near_the_checked_length():
    m = StopStringMatcher(["stop"])
    assert m.find("stop and more", 10) is None  # the old match would have been found earlier
    assert m.find("abcsto" + "p", 6) == StopMatch("stop", 3)


def test_visible_len_holds_back_a_possible_stop_prefix():
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.visible_len("abc ST") == 4
    assert m.visible_len("abc\n") == 3
    assert m.visible_len("abc S T") == 7
    assert m.visible_len("") == 0


def test_empty_and_duplicate_stops_are_ignored():
    m = StopStringMatcher(["", "x", "x"])
    assert m.stops == ["x"]
    assert not StopStringMatcher([""])
    assert StopStringMatcher([]).find("abc", 0) is None


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=30),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_streaming_matches_full_search_and_never_shows_past_the_stop(text, stops):
    m = StopStringMatcher(stops)
    found = None
    checked = 0
    for i in range(1, len(text) + 1):
        prefix = text[:i]
        found = m.find(prefix, checked)
        if found is not None:
            break
        checked = i
        visible = prefix[: m.visible_len(prefix)]
        # the visible text never contains (part of) a stop string that completes later
        for s in m.stops:
            pos = text.find(s)
            if pos >= 0:
                assert len(visible) <= pos
    positions = [(text.find(s) + len(s), text.find(s), s) for s in m.stops if s in text]
    if not positions:
        assert found is None
    else:
        end, start, _ = min(positions)
        assert found is not None
        assert (found.start + len(found.stop), found.start) == (end, start)


# ---------------------------------------------------------------------- one sample's text (SampleTracker)


def _out(ids, finished=False, reason=None, logprobs=True):
    from pdserve.shared.protocol import RequestOutput

    return RequestOutput(
        rid="r",
        token_ids=list(ids),
        finished=finished,
        finish_reason=reason,
        prompt_tokens=3,
        completion_tokens=0,
        output_token_logprobs=[[-0.5, t] for t in ids] if logprobs else None,
    )


def _tracker(**params):
    from pdserve.router.serving.sample_tracker import SampleTracker
    from tests.helpers.tiny_models import _byte_tokenizer

    return SampleTracker(0, _byte_tokenizer(), params, text_in_logprobs=True)


def test_tracker_stops_at_the_token_that_completes_the_stop_string():
    t = _tracker(stop=["cd"])
    e1 = t.apply(_out(b"abc"))
    assert (e1.text, e1.text_delta, e1.finished) == ("ab", "ab", False)  # "c" may start "cd": held
    e2 = t.apply(_out(b"dxy"))  # "d" completes the stop; "x", "y" are dropped with their logprobs
    assert (e2.text, e2.text_delta, e2.finished) == ("ab", "", True)
    assert e2.finish_reason == {"type": "stop", "matched": "cd"}
    assert e2.token_ids == [ord("d")] and e2.output_ids == list(b"abcd") and e2.completion_tokens == 4
    assert e2.output_token_logprobs == [[-0.5, ord("d"), "d"]]
    assert t.apply(_out(b"z", finished=True)).token_ids == []  # later outputs change nothing
    summary = t.summary_event()
    assert summary.text == "ab" and len(summary.output_token_logprobs) == 4


def test_tracker_releases_held_text_when_the_worker_finishes():
    t = _tracker(stop=["STOP"], no_stop_trim=True)
    assert t.apply(_out(b"go ST")).text == "go "
    end = t.apply(_out(b"", finished=True, reason={"type": "length", "length": 5}))
    assert (end.text, end.text_delta) == ("go ST", "ST")
    assert end.finish_reason == {"type": "length", "length": 5}


def test_tracker_without_stops_passes_the_worker_finish_reason():
    t = _tracker()
    e = t.apply(_out(b"hi", finished=True, reason={"type": "stop", "matched": 258}, logprobs=False))
    assert (e.text, e.finish_reason, e.output_token_logprobs) == (
        "hi",
        {"type": "stop", "matched": 258},
        None,
    )
