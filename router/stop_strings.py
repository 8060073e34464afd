"""Stop strings on generated text: find the first one, and never show text that may become one.

Rules (SGLang's behaviour):
- text is checked as it grows; the first stop string to appear (the one that ends earliest; among
  those, the one that starts earliest) ends the sample with finish_reason
  {"type": "stop", "matched": <the stop string>};
- the visible text ends where the stop string begins (`no_stop_trim` keeps the stop string);
- while the sample runs, a tail of the text that is a prefix of some stop string is held back
  (`visible_text`), so a client never sees text past a stop, not even part of one;
- empty stop strings are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    stop: str
    start: int  # index in the text where the stop string begins


class StopStringMatcher:
    def __init__(self, stops: list[str], no_stop_trim: bool = False):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.no_stop_trim = no_stop_trim
        self._longest = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, checked_len: int) -> StopMatch | None:
        """The first stop string in `text` that ends after `checked_len` (text before it held none).

        Only the last `checked_len - longest + 1` characters onward are searched: an earlier match
        would have been found by the previous call."""
        if not self.stops:
            return None
        start = max(0, checked_len - self._longest + 1)
        best: StopMatch | None = None
        best_end = 0
        for stop in self.stops:
            pos = text.find(stop, start)
            if pos < 0:
                continue
            end = pos + len(stop)
            if best is None or end < best_end or (end == best_end and pos < best.start):
                best, best_end = StopMatch(stop, pos), end
        return best

    def final_text(self, text: str, match: StopMatch) -> str:
        """The text a matched sample ends with."""
        end = match.start + len(match.stop) if self.no_stop_trim else match.start
        return text[:end]

    def visible_len(self, text: str) -> int:
        """How much of a running sample's text may be shown: all but a tail that is a proper prefix
        of some stop string (it may still grow into one)."""
        if not self.stops or not text:
            return len(text)
        for held in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-held:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - held
        return len(text)
