"""`stop_regex`: the first match ends the sample, text is trimmed like a stop string's, and the
streaming hold-back never shows text a later match starts in, also when the match spans tokens.

The property test grows a text one character at a time (as a stream does) and checks both promises
against a brute force: the stream stops at the shortest prefix in which the pattern matches, with
that prefix's match, and no visible text before then reaches past where that match begins.
"""

from __future__ import annotations

import time

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.text.stop_strings import StopMatch, StopRegexTimeout, StopStringMatcher
from pdserve.shared.engine.sampling_params import SamplingParams, SamplingParamsError
from tests.unit.test_stop_strings import _out, _tracker


def test_a_match_ends_the_text_where_it_begins():
    m = StopStringMatcher([], regexes=[r"\d+ apples"])
    text = "I have 12 apples and"
    match = m.find(text, 0)
    assert match == StopMatch(r"\d+ apples", 7, 16)
    assert m.final_text(text, match) == "I have "


def test_no_stop_trim_keeps_the_matched_text():
    m = StopStringMatcher([], no_stop_trim=True, regexes=[r"\n\n+"])
    text = "a\n\n\nb"
    assert m.final_text(text, m.find(text, 0)) == "a\n\n\n"


def test_strings_and_regexes_the_one_that_ends_first_wins():
    m = StopStringMatcher(["world"], regexes=[r"l+o"])
    assert m.find("hello world", 0) == StopMatch("l+o", 2, 5)
    m = StopStringMatcher(["hel"], regexes=[r"l+o"])
    assert m.find("hello", 0) == StopMatch("hel", 0)


def test_visible_len_holds_back_from_where_a_match_may_still_start():
    m = StopStringMatcher([], regexes=[r"\d{3}"])
    assert m.visible_len("ab12") == 2  # "12" may become three digits
    assert m.visible_len("ab1x") == 4  # "1x" never will
    m = StopStringMatcher([], regexes=[r"BEGIN.*END"])
    assert m.visible_len("intro BEGIN middle") == len("intro ")  # anything after BEGIN may end in END
    m = StopStringMatcher(["STOP"], regexes=[r"x{5}"])
    assert m.visible_len("abc xx ST") == len("abc xx ")  # the stop string holds back more


def test_a_search_that_backtracks_without_end_raises():
    m = StopStringMatcher([], regexes=[r"(a|aa)+$"])
    start = time.perf_counter()
    with pytest.raises(StopRegexTimeout, match=r"took longer than 50 ms"):
        m.find("a" * 60 + "b", 0)
    assert time.perf_counter() - start < 2.0


PATTERNS = [r"ab+c", r"a.b", r"(ab)+\n", r"b{2,3}a", r"c$", r"\nb|ca"]


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="abc\n", max_size=30), pattern=st.sampled_from(PATTERNS))
def test_streaming_stops_at_the_first_prefix_that_matches_and_never_shows_past_it(text, pattern):
    compiled = regex.compile(pattern)
    first = next((i for i in range(len(text) + 1) if compiled.search(text[:i])), None)
    expected = compiled.search(text[:first]) if first is not None else None
    m = StopStringMatcher([], regexes=[pattern])
    found, shown, checked = None, "", 0
    for i in range(1, len(text) + 1):
        prefix = text[:i]
        found = m.find(prefix, checked)
        if found is not None:
            break
        checked = i
        visible = prefix[: m.visible_len(prefix)]
        assert visible.startswith(shown)  # the visible text never shrinks
        shown = visible
    if expected is None:
        assert found is None
    else:
        assert found == StopMatch(pattern, expected.start(), expected.end())
        assert len(shown) <= expected.start()  # nothing the match starts in was ever shown


# ---------------------------------------------------------------------- across tokens (SampleTracker)


def test_tracker_stops_at_the_token_that_completes_a_match_spanning_tokens():
    t = _tracker(stop_regex=r"Answer: \d+")
    first = t.apply(_out(b"So. Ans"))
    assert (first.text, first.finished) == ("So. ", False)  # "Ans" may start a match: held back
    second = t.apply(_out(b"wer: 42!"))  # one token per byte: the match completes at "4"
    assert (second.text, second.text_delta, second.finished) == ("So. ", "", True)
    assert second.finish_reason == {"type": "stop", "matched": r"Answer: \d+"}
    assert second.token_ids == list(b"wer: 4")  # later ids and their logprobs are dropped
    assert second.output_ids == list(b"So. Answer: 4")
    assert len(second.output_token_logprobs) == len(b"wer: 4")


def test_tracker_no_stop_trim_and_release_when_the_worker_finishes():
    t = _tracker(stop_regex=[r"\d\d\d"], no_stop_trim=True)
    assert t.apply(_out(b"code 12")).text == "code "
    end = t.apply(_out(b"", finished=True, reason={"type": "length", "length": 7}))
    assert (end.text, end.finish_reason) == ("code 12", {"type": "length", "length": 7})

    t = _tracker(stop_regex=r"\d\d\d", no_stop_trim=True)
    assert t.apply(_out(b"code 123 more")).text == "code 123"


def test_tracker_ends_a_sample_whose_regex_backtracks_without_end_as_a_400():
    t = _tracker(stop_regex=r"(a|aa)+c")
    event = t.apply(_out(b"x" + b"a" * 60))  # each search of the growing run of a's takes longer
    assert event.finished and event.finish_reason["type"] == "abort"
    assert event.finish_reason["status_code"] == 400 and "stop_regex" in event.finish_reason["message"]


def test_sampling_params_check_stop_regex_and_stream_interval():
    params = SamplingParams.from_dict({"stop_regex": r"\d+", "stream_interval": 4})
    assert (params.stop_regex, params.stream_interval) == ([r"\d+"], 4)
    bad = [
        ({"stop_regex": "("}, "not a valid regular expression"),
        ({"stop_regex": [1]}, "stop_regex must be a string or a list of strings"),
        ({"stop_regex": ""}, "must not be empty"),
        ({"stop_regex": ["a"] * 17}, "more than the limit of 16"),
        ({"stream_interval": 0}, "stream_interval must be >= 1"),
        ({"stream_interval": 1.5}, "stream_interval must be an integer"),
    ]
    for raw, words in bad:
        with pytest.raises(SamplingParamsError, match=regex.escape(words)):
            SamplingParams.from_dict(raw)
