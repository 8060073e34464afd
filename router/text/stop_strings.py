"""Stop strings and stop regexes on generated text: find the first one, and never show text that
may become one.

    matcher = StopStringMatcher(["\\n\\n"], regexes=[r"Answer: \\d+"])
    match = matcher.find(text, checked_len)          # StopMatch | None
    shown = text[: matcher.visible_len(text)]        # while the sample runs

Rules (SGLang's behaviour):
- text is checked as it grows; the first stop string or regex match to appear (the one that ends
  earliest; among those, the one that starts earliest) ends the sample with finish_reason
  {"type": "stop", "matched": <the stop string, or the stop_regex pattern>};
- the visible text ends where the match begins (`no_stop_trim` keeps the matched text);
- while the sample runs, a tail of the text that is a prefix of some stop string, or from which a
  stop regex could still match once more text comes (a partial match reaching the end of the text),
  is held back (`visible_len`), so a client never sees text past a stop, not even part of one;
- a regex is searched in the whole text each time (a match may span any number of tokens), with
  the `regex` module's partial matching for the hold-back; a search that takes longer than
  REGEX_TIMEOUT_S raises StopRegexTimeout (a pattern that backtracks without end must not stall
  the router: the sample is ended with an error instead);
- empty stop strings are ignored;
- a request may ask for at most MAX_STOP_STRINGS stop strings of at most MAX_STOP_STRING_CHARS
  characters each (MAX_STOP_CHARS_TOTAL in all) and at most MAX_STOP_TOKEN_IDS stop token ids
  (`check_stop_limits`; the HTTP layers answer 400 naming the limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import regex

# OpenAI allows 4 stop sequences; SGLang and vLLM set no bound, and SGLang users pass dozens (one
# per role tag, per language). The bounds are far above any real use and keep the router's work per
# streamed token small: every stop string is searched on each new token, and the hold-back of
# `visible_len` may try each place of a repetitive stop string, so its cost follows the total length
# (adversarial strings: ~30 ms per token at 256 x 1024 characters, ~1.5 ms at 16,384 in all;
# 100,000 stop strings cost seconds per token).
MAX_STOP_STRINGS = 256
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_CHARS_TOTAL = 16384
# A stop regex search runs on the router's event loop on every new token: one that takes this long
# is a pattern that backtracks without end, not a real stop condition.
REGEX_TIMEOUT_S = 0.05
# Stop token ids are a set lookup per token, but travel to the worker and are checked one by one
# on every request; 1024 is more than the special tokens of any tokenizer.
MAX_STOP_TOKEN_IDS = 1024


class StopLimitError(ValueError):
    """A stop list over its limit; `param` is the request field (`stop` or `stop_token_ids`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


def check_stop_limits(stop: Any, stop_token_ids: Any) -> None:
    """Raises StopLimitError when `stop` (a string or a list) or `stop_token_ids` is over a limit.

    Only sizes are checked here, before anything walks the lists; types are checked by the caller."""
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, list):
        if len(stops) > MAX_STOP_STRINGS:
            raise StopLimitError(
                f"stop has {len(stops)} stop strings, more than the limit of {MAX_STOP_STRINGS}.", "stop"
            )
        longest = max((len(s) for s in stops if isinstance(s, str)), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise StopLimitError(
                f"stop has a stop string of {longest} characters, more than the limit of "
                f"{MAX_STOP_STRING_CHARS}.",
                "stop",
            )
        total = sum(len(s) for s in stops if isinstance(s, str))
        if total > MAX_STOP_CHARS_TOTAL:
            raise StopLimitError(
                f"stop has {total} characters in all, more than the limit of {MAX_STOP_CHARS_TOTAL}.", "stop"
            )
    if isinstance(stop_token_ids, list) and len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise StopLimitError(
            f"stop_token_ids has {len(stop_token_ids)} ids, more than the limit of {MAX_STOP_TOKEN_IDS}.",
            "stop_token_ids",
        )


class StopRegexTimeout(Exception):
    """A stop regex search took longer than REGEX_TIMEOUT_S; `str()` is for the client."""


@dataclass(frozen=True)
class StopMatch:
    stop: str  # the stop string, or the stop_regex pattern that matched
    start: int  # index in the text where the match begins
    end: int = -1  # where it ends; -1: start + len(stop) (a stop string)

    @property
    def match_end(self) -> int:
        return self.start + len(self.stop) if self.end < 0 else self.end


class StopStringMatcher:
    def __init__(self, stops: list[str], no_stop_trim: bool = False, regexes: list[str] | None = None):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.no_stop_trim = no_stop_trim
        self._longest = max((len(s) for s in self.stops), default=0)
        # patterns were checked by SamplingParams (valid, bounded); compiled once per sample
        self._regexes = [regex.compile(p) for p in dict.fromkeys(regexes or []) if p]

    def __bool__(self) -> bool:
        return bool(self.stops) or bool(self._regexes)

    def find(self, text: str, checked_len: int) -> StopMatch | None:
        """The first stop string or regex match in `text` that ends after `checked_len` (text
        before it held none); StopRegexTimeout when a regex search runs too long.

        Stop strings are searched from `checked_len - longest + 1` on (an earlier match would have
        been found by the previous call); regexes in the whole text."""
        best: StopMatch | None = None
        if self.stops:
            start = max(0, checked_len - self._longest + 1)
            for stop in self.stops:
                pos = text.find(stop, start)
                if pos >= 0:
                    best = _earlier(best, StopMatch(stop, pos))
        for pattern in self._regexes:
            found = _search(pattern, text, partial=False)
            if found is not None:
                best = _earlier(best, StopMatch(pattern.pattern, found.start(), found.end()))
        return best

    def final_text(self, text: str, match: StopMatch) -> str:
        """The text a matched sample ends with."""
        end = match.match_end if self.no_stop_trim else match.start
        return text[:end]

    def visible_len(self, text: str) -> int:
        """How much of a running sample's text may be shown: all but a tail that is a proper prefix
        of some stop string, or where a stop regex's partial match begins (it may still grow into
        a stop); StopRegexTimeout when a regex search runs too long."""
        held = 0
        for stop in self.stops:
            held = _longest_held(stop, text, held)
        for pattern in self._regexes:
            found = _search(pattern, text, partial=True)
            if found is not None and found.partial:
                held = max(held, len(text) - found.start())
        return len(text) - held


def _earlier(best: StopMatch | None, match: StopMatch) -> StopMatch:
    """The one that ends first; of two that end together, the one that starts first."""
    if best is None or (match.match_end, match.start) < (best.match_end, best.start):
        return match
    return best


def _search(pattern: regex.Pattern, text: str, partial: bool) -> regex.Match | None:
    try:
        return pattern.search(text, partial=partial, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise StopRegexTimeout(
            f"stop_regex {pattern.pattern!r} took longer than {REGEX_TIMEOUT_S * 1000:g} ms to search "
            f"{len(text)} characters of output: the request was ended."
        ) from None


PROBE_CHARS = 8  # characters matched at C speed (str.find/count) to pick the tails worth trying


def _longest_held(stop: str, text: str, held: int) -> int:
    """The longest k > held such that text ends with stop[:k] (k < len(stop)), else held.

    Only tails that can match are tried, longest first, found by C-speed searches: one of k >= m
    characters begins with stop[:m] and ends with text[-m:] (the sparser of the two lists of
    places is walked); a shorter one begins with stop[0]. Without this, every length would be
    tried against every stop string on every new token."""
    n = len(text)
    hi = min(len(stop) - 1, n)
    if hi <= held:
        return held
    m = min(hi, PROBE_CHARS)
    lo = max(held + 1, m)  # tails of lo..hi characters, by the probes
    if lo <= hi:
        head, tail = stop[:m], text[-m:]
        end = n - lo + m  # a head at i (tail length n - i >= lo) lies within text[n - hi : end]
        if text.count(head, n - hi, end) <= stop.count(tail, lo - m, hi):
            i = text.find(head, n - hi, end)
            while i >= 0:
                if stop.startswith(text[i:]):
                    return n - i
                i = text.find(head, i + 1, end)
        else:
            j = stop.rfind(tail, lo - m, hi)
            while j >= 0:
                if text.endswith(stop[: j + m]):
                    return j + m
                j = stop.rfind(tail, lo - m, j + m - 1)
    top = min(m - 1, hi)  # shorter tails: where text has stop[0]
    i = text.find(stop[0], n - top, n - held)
    while i >= 0:
        if stop.startswith(text[i:]):
            return n - i
        i = text.find(stop[0], i + 1, n - held)
    return held
