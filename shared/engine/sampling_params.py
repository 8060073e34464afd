"""Sampling parameters with SGLang's names, defaults and validation.

`SamplingParams.from_dict` is the single entry point from the wire: unknown keys and values out of
range raise `SamplingParamsError` whose message names the field and its allowed range, so the router
can answer HTTP 400 with it verbatim.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import regex

from pdserve.shared.engine.structural_tag import StructuralTagError, check_structural_tag

# SGLang's "top_k disabled" sentinel is 1 << 30; -1 is accepted too and normalised to it.
TOP_K_ALL = 1 << 30
# The router searches every stop regex in the whole output on each new token (a match may span any
# number of tokens), so their number and size are bounded like stop strings' (router/text/stop_strings.py).
MAX_STOP_REGEX = 16
MAX_STOP_REGEX_CHARS = 1024
# Constrained decoding (shared/engine/grammar.py): at most one of these per request, its source a string.
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")


class SamplingParamsError(ValueError):
    """A sampling parameter is missing its type or range; the message is safe to show a client."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # applied by the router on text
    stop_regex: list[str] = field(default_factory=list)  # applied by the router on text, like stop
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    stream_interval: int | None = None  # report tokens every N (None: every step)
    sampling_seed: int | None = None
    logit_bias: dict[str, float] | None = None
    # Constrained decoding (GRAMMAR_FIELDS)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> SamplingParams:
        raw = dict(raw or {})
        unknown = sorted(raw.keys() - _FIELD_NAMES)
        if unknown:
            raise SamplingParamsError(f"Unknown sampling parameter(s): {', '.join(unknown)}.")
        for key in ("stop", "stop_regex"):
            if isinstance(raw.get(key), str):
                raw[key] = [raw[key]]
        for key in ("stop", "stop_regex", "stop_token_ids"):
            if raw.get(key) is None and key in raw:
                raw[key] = []
        params = cls(**raw)
        params.validate()
        return params

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        _check_int(self, "max_new_tokens", lo=0)
        _check_int(self, "min_new_tokens", lo=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens must be <= max_new_tokens, got {self.min_new_tokens} > {self.max_new_tokens}."
            )
        _check_float(self, "temperature", lo=0.0, hi=None, rng="[0, inf)")
        _check_float(self, "top_p", lo=0.0, hi=1.0, lo_open=True, rng="(0, 1]")
        _check_float(self, "min_p", lo=0.0, hi=1.0, rng="[0, 1]")
        _check_float(self, "frequency_penalty", lo=-2.0, hi=2.0, rng="[-2, 2]")
        _check_float(self, "presence_penalty", lo=-2.0, hi=2.0, rng="[-2, 2]")
        _check_float(self, "repetition_penalty", lo=0.0, hi=2.0, lo_open=True, rng="(0, 2]")
        _check_int(self, "top_k", lo=-1)
        if self.top_k == 0:
            raise SamplingParamsError("top_k must be -1 (disabled) or at least 1, got 0.")
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        _check_int(self, "n", lo=1)
        if self.sampling_seed is not None:
            _check_int(self, "sampling_seed", lo=None)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop must be a string or a list of strings.")
        _check_stop_regex(self.stop_regex)
        if self.stream_interval is not None:
            _check_int(self, "stream_interval", lo=1)
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise SamplingParamsError("stop_token_ids must be a list of non-negative integers.")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be a boolean.")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingParamsError("logit_bias must be an object mapping token ids to floats.")
            for tok, bias in self.logit_bias.items():
                if not str(tok).lstrip("-").isdigit() or int(tok) < 0:
                    raise SamplingParamsError(f"logit_bias keys must be token ids, got {tok!r}.")
                if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
                    raise SamplingParamsError(f"logit_bias values must be finite numbers, got {bias!r}.")
        _check_grammar(self)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids must exist in the model's vocabulary."""
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise SamplingParamsError(
                    f"stop_token_ids entry {tok} is outside the vocabulary [0, {vocab_size})."
                )
        for tok in self.logit_bias or {}:
            if int(tok) >= vocab_size:
                raise SamplingParamsError(
                    f"logit_bias key {tok} is outside the vocabulary [0, {vocab_size})."
                )


def _check_grammar(p: SamplingParams) -> None:
    given = [name for name in GRAMMAR_FIELDS if getattr(p, name) is not None]
    if len(given) > 1:
        raise SamplingParamsError(
            f"Only one of json_schema, regex, ebnf and structural_tag may be set, got {', '.join(given)}."
        )
    for name in given:
        if not isinstance(getattr(p, name), str):
            raise SamplingParamsError(f"{name} must be a string.")
    if p.json_schema is not None:
        try:
            json.loads(p.json_schema)
        except ValueError as exc:
            raise SamplingParamsError(f"json_schema is not valid JSON: {exc}.") from None
    if p.structural_tag is not None:
        try:
            check_structural_tag(p.structural_tag)
        except StructuralTagError as exc:
            raise SamplingParamsError(str(exc)) from None


def _check_stop_regex(patterns: Any) -> None:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise SamplingParamsError("stop_regex must be a string or a list of strings.")
    if len(patterns) > MAX_STOP_REGEX:
        raise SamplingParamsError(
            f"stop_regex has {len(patterns)} patterns, more than the limit of {MAX_STOP_REGEX}."
        )
    for pattern in patterns:
        if len(pattern) > MAX_STOP_REGEX_CHARS:
            raise SamplingParamsError(
                f"stop_regex has a pattern of {len(pattern)} characters, more than the limit of "
                f"{MAX_STOP_REGEX_CHARS}."
            )
        if not pattern:
            raise SamplingParamsError("stop_regex patterns must not be empty (one would match at once).")
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise SamplingParamsError(
                f"stop_regex {pattern!r} is not a valid regular expression: {exc}."
            ) from None


def _check_int(p: SamplingParams, name: str, lo: int | None) -> None:
    value = getattr(p, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}.")
    if lo is not None and value < lo:
        raise SamplingParamsError(f"{name} must be >= {lo}, got {value}.")


def _check_float(
    p: SamplingParams, name: str, lo: float, hi: float | None, rng: str, lo_open: bool = False
) -> None:
    value = getattr(p, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number in {rng}, got {value!r}.")
    value = float(value)
    setattr(p, name, value)
    below = value <= lo if lo_open else value < lo
    if below or (hi is not None and value > hi):
        raise SamplingParamsError(f"{name} must be in {rng}, got {value}.")


_FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))  # fields() is slow per call
