"""One sample's text as it grows: detokenization, stop strings and logprob entries, per worker output.

Rules:
- `apply(out)` turns one RequestOutput of the sample into one SampleEvent (router/serving/generator_api.py);
- with stop strings or stop regexes (`stop_regex`), ids are taken one at a time, so a stop ends the
  sample at the token that completed it: later ids of the same output are dropped, and so are
  their logprobs; finish_reason becomes {"type": "stop", "matched": <stop string or pattern>};
  a stop regex whose search runs too long ends the sample with finish_reason abort and the reason;
- visible text never shrinks and never shows (part of) a stop string, nor half a character;
- logprob entries become `[logprob, token_id, text]`, text only with `return_text_in_logprobs`
  (each token decoded alone, special tokens kept, like SGLang);
- the tracker also keeps everything cumulative, for `summary_event()` (buffered consumers) and
  for the native API's cumulative stream chunks;
- `absorb(out)` is `apply(out)` for buffered consumers, which only read `summary_event()`: no event
  per output, and without stop strings no text until the sample finishes, when its ids are decoded
  once (the same text: incremental detokenization equals the full decode).
"""

from __future__ import annotations

from typing import Any

from pdserve.router.serving.generator_api import SampleEvent
from pdserve.router.text.detokenizer import IncrementalDetokenizer
from pdserve.router.text.stop_strings import StopRegexTimeout, StopStringMatcher
from pdserve.router.text.tokenizer_fast import Decoder, fast_decoder
from pdserve.shared.protocol import RequestOutput

LOGPROB_FIELDS = (
    "output_token_logprobs",
    "output_top_logprobs",
    "output_token_ids_logprobs",
    "input_token_logprobs",
    "input_top_logprobs",
    "input_token_ids_logprobs",
)


def stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class SampleTracker:
    def __init__(
        self,
        index: int,
        tokenizer: Any,
        sampling_params: dict[str, Any],
        text_in_logprobs: bool,
        decoder: Decoder | None = None,
        buffered: bool = False,
    ):
        self.index = index
        self._decoder = decoder or fast_decoder(tokenizer)
        self._skip = bool(sampling_params.get("skip_special_tokens", True))
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=self._skip, decoder=self._decoder)
        self._matcher = StopStringMatcher(
            stop_list(sampling_params.get("stop")),
            bool(sampling_params.get("no_stop_trim", False)),
            stop_list(sampling_params.get("stop_regex")),
        )
        self._text_at_end = buffered and not self._matcher  # see absorb()
        self._text_in_logprobs = text_in_logprobs
        self._checked = 0  # length of detokenized text already searched for stop strings
        self.text = ""  # visible text
        self._stop_text: str | None = None  # the final text when a stop string ended the sample
        self.output_ids: list[int] = []
        self.done = False
        self.finish_reason: dict[str, Any] | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.logprobs: dict[str, list] = {}  # cumulative lists, only the fields the worker sent

    @property
    def has_stop_strings(self) -> bool:
        """Whether a stop string may end the sample at any token (not only at the worker's end)."""
        return bool(self._matcher)

    # ------------------------------------------------------------------ per output

    def apply(self, out: RequestOutput) -> SampleEvent:
        kept, new_logprobs = self._absorb(out)
        text = self._visible_text()
        delta = text[len(self.text) :]
        self.text = text
        event = SampleEvent(
            index=self.index,
            text=text,
            text_delta=delta,
            token_ids=kept,
            output_ids=list(self.output_ids),
            finished=self.done,
            finish_reason=self.finish_reason if self.done else None,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
        )
        for name, formatted in new_logprobs:
            setattr(event, name, formatted)
        return event

    def absorb(self, out: RequestOutput) -> None:
        """`apply` without the event, for consumers that read only `summary_event()`."""
        if self._text_at_end:
            self._absorb_ids_only(out)
        else:
            self._absorb(out)
            self.text = self._visible_text()

    def _absorb(self, out: RequestOutput) -> tuple[list[int], list[tuple[str, list]]]:
        """Takes one output in; returns the ids kept and the new logprob entries by field."""
        kept = self._take_ids(out.token_ids)
        self.output_ids.extend(kept)
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        if not self.done and out.finished:
            self._detok.finish()
            self._check_stop()
            if not self.done:
                self.done = True
                self.finish_reason = _public_finish_reason(out.finish_reason)
        return kept, self._add_logprobs(out, len(kept))

    def _absorb_ids_only(self, out: RequestOutput) -> None:
        """No stop strings and nobody reads the text before the end: ids now, one decode at the end."""
        if self.done:
            return
        self.output_ids.extend(out.token_ids)
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        self._add_logprobs(out, len(out.token_ids))
        if out.finished:
            self.done = True
            self.finish_reason = _public_finish_reason(out.finish_reason)
            self.text = self._decoder(self.output_ids, self._skip)

    def _take_ids(self, ids: list[int]) -> list[int]:
        """Feeds ids to the detokenizer; with stop strings, stops at the id that completes one."""
        if self.done:
            return []
        if not self._matcher:
            self._detok.add(ids)
            return list(ids)
        for k, token in enumerate(ids):
            self._detok.add([token])
            if self._check_stop():
                return list(ids[: k + 1])
        return list(ids)

    def _check_stop(self) -> bool:
        text = self._detok.text
        try:
            match = self._matcher.find(text, self._checked) if self._matcher else None
        except StopRegexTimeout as exc:
            return self._end_on_regex_timeout(str(exc))
        self._checked = len(text)
        if match is None:
            return False
        self.done = True
        self.finish_reason = {"type": "stop", "matched": match.stop}
        self._stop_text = self._matcher.final_text(text, match)
        return True

    def _end_on_regex_timeout(self, message: str) -> bool:
        """Ends the sample (a client's pattern, so a 400): the text shown so far is what it ends with."""
        self.done = True
        self.finish_reason = {"type": "abort", "message": message, "status_code": 400}
        self._stop_text = self.text
        return True

    def _visible_text(self) -> str:
        if self._stop_text is not None:
            return self._stop_text
        if self.done:
            return self._detok.text
        text = self._detok.text
        if not self._matcher:
            return text
        try:
            return text[: self._matcher.visible_len(text)]
        except StopRegexTimeout as exc:
            self._end_on_regex_timeout(str(exc))
            return self.text

    # ------------------------------------------------------------------ logprobs

    def _entry(self, pair: list[Any] | None) -> list[Any] | None:
        if pair is None:
            return None
        logprob, token_id = pair[0], pair[1]
        text = self._decoder([token_id], False) if self._text_in_logprobs else None
        return [logprob, token_id, text]

    def _entries(self, pairs: list[Any] | None) -> list[Any] | None:
        return None if pairs is None else [self._entry(p) for p in pairs]

    def _add_logprobs(self, out: RequestOutput, num_kept: int) -> list[tuple[str, list]]:
        """Formats the output's logprob fields (the output ones cut to the kept ids), adds them to
        the cumulative lists and returns them."""
        new: list[tuple[str, list]] = []
        for name in LOGPROB_FIELDS:
            raw = getattr(out, name)
            if raw is None:
                continue
            if name.startswith("output_"):
                raw = raw[:num_kept]
            if name.endswith("token_logprobs"):
                formatted = self._entries(raw)
            else:  # per position: a list of pairs, or None
                formatted = [self._entries(pos) for pos in raw]
            new.append((name, formatted))
            self.logprobs.setdefault(name, []).extend(formatted)
        return new

    # ------------------------------------------------------------------ whole sample

    def summary_event(self) -> SampleEvent:
        """Everything of the finished sample as one event (for consumers that buffer)."""
        event = SampleEvent(
            index=self.index,
            text=self.text,
            text_delta=self.text,
            token_ids=list(self.output_ids),
            output_ids=list(self.output_ids),
            finished=True,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
        )
        for name, values in self.logprobs.items():
            setattr(event, name, list(values))
        return event


def _public_finish_reason(reason: dict[str, Any] | None) -> dict[str, Any] | None:
    """The worker's finish reason as clients see it (a copy: events must not share dicts)."""
    return None if reason is None else dict(reason)
