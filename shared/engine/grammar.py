"""Constrained decoding on a worker: compiled grammars, one matcher per sample, the batch's bitmask.

Where each piece lives (the README's "Constrained decoding" note says the same):
- The wire carries the grammar's source: `json_schema`, `regex`, `ebnf` or `structural_tag` in
  the sampling params (the router turns OpenAI's `response_format` into `json_schema` or
  `structural_tag`; structural_tag.py gives a structural tag its canonical form). Each worker
  compiles it here with xgrammar against its own tokenizer and keeps the result in an LRU cache keyed by
  (kind, canonical source): a JSON schema's compact JSON (no spaces; property order kept, since
  it is the order the model must write them), so differently spaced equal schemas compile once. Why not ship xgrammar's serialized grammar from
  the router: measured on SmolLM2-135M's 49k vocabulary on the dev box, a typical nested schema
  compiles in 15 ms, while its serialization is 150 KB (210 KB for `json_object`) and deserializing
  it costs 9 ms: every request would carry 150 KB over ZMQ to save 6 ms once per schema per worker.
  A new source compiles off the request path, on the engine's compile thread (grammar_compiles.py
  says how a request waits for it and what was measured); a cache hit is a dict lookup at intake.
  A source that xgrammar cannot compile ends the request with a `RequestError`'s message, which
  the router answers with a 400 naming xgrammar's reason, as a refusal at intake.
- Matcher state lives in the request (`Req.grammar`, a `SampleGrammar`): it advances with every
  token appended to the request's output, wherever that happens (the scheduler's step results,
  the decode worker's first token from the prefill worker, the tokens a moved request brings in
  `generated_ids`), so P/D handoff, migration and retries (a fresh request, a fresh matcher) keep
  it in step with `output_ids`.
- Masking: before a step samples, `grammar_bitmask` fills one int32 row per request on the CPU
  (all ones for unconstrained and finished rows, which leaves their logits bit-identical) and the
  sampler applies it with one kernel for the batch (kernels/token_bitmask.py). A row's mask needs
  its previous token, its forward does not: with overlap scheduling a decode step with constrained
  rows launches its forward at once (on the device's future ids; CUDA graph replay included), then
  the host reads the step before, whose tokens are ready while that forward runs, advances the
  matchers, fills the mask and launches the sampling (batch_pipeline.py). Jump-forward needs the
  token before the next step is planned, so with it on, such steps are read back at once.
- A matcher that terminates (it accepted a stop token at the grammar's end) ends the request with
  SGLang's reason, `{"type": "stop", "matched": token}` (scheduler_role.py).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.engine.sampling_params import GRAMMAR_FIELDS, SamplingParams
from pdserve.shared.engine.structural_tag import canonical_structural_tag

if TYPE_CHECKING:
    from pdserve.shared.engine.request import Req, TokenGrammar

_CACHE_ENTRIES = 256
# JSON may hold whitespace between tokens, but a run of it is capped: an unsure model otherwise
# spends its whole token budget on whitespace and never closes the object.
_MAX_WHITESPACE = 2
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and some with the check that
# failed); the reason is what follows.
_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def grammar_source(params: SamplingParams) -> tuple[str, str] | None:
    """(kind, canonical source) of a constrained request, None for a free one."""
    for kind in GRAMMAR_FIELDS:
        source = getattr(params, kind)
        if source is not None:
            if kind == "json_schema":
                # property order stays: it is the order the grammar makes the model write them
                source = json.dumps(json.loads(source), separators=(",", ":"))
            elif kind == "structural_tag":
                source = canonical_structural_tag(source, _MAX_WHITESPACE)
            return kind, source
    return None


class SampleGrammar:
    """One sample's matcher. `accept` advances it by a token; a refused token leaves it where it was
    and sets `rejected` (the sampler never picks one, but a moved request's tokens may not fit)."""

    def __init__(self, compiled: Any):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)
        self.rejected = False

    def accept(self, token: int) -> bool:
        ok = bool(self._matcher.accept_token(token))
        self.rejected = self.rejected or not ok
        return ok

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def forced_string(self) -> str:
        """The text the grammar allows and no other from here (jump_forward.py)."""
        return str(self._matcher.find_jump_forward_string())

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)


class GrammarBackend:
    """A worker's compiler and cache. The tokenizer is read on the first constrained request, so a
    worker that never sees one pays nothing."""

    def __init__(
        self, tokenizer_path: str, vocab_size: int, stop_token_ids: frozenset[int], trust_remote_code=False
    ):
        self._tokenizer_path = tokenizer_path
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._trust_remote_code = trust_remote_code
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def cached(self, key: tuple[str, str]) -> Any:
        """The compiled grammar of a `grammar_source` key (now the most recently used), else None."""
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
        return compiled

    def store(self, key: tuple[str, str], compiled: Any) -> None:
        self._cache[key] = compiled
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def compile(self, kind: str, source: str) -> Any:
        """Compiles a `grammar_source` key (the cache is the caller's); raises RequestError naming
        xgrammar's reason. One thread at a time: it makes the compiler on first use."""
        compiler = self._compiler or self._new_compiler()
        try:
            if kind == "json_schema":
                return compiler.compile_json_schema(source, max_whitespace_cnt=_MAX_WHITESPACE)
            if kind == "regex":
                return compiler.compile_regex(source)
            if kind == "structural_tag":
                return compiler.compile_structural_tag(source)
            return compiler.compile_grammar(source)
        except (RuntimeError, ValueError) as exc:  # xgrammar's errors derive from these
            reason = (
                _LOCATION.sub("", str(exc).strip()).splitlines()[0]
                if str(exc).strip()
                else type(exc).__name__
            )
            raise RequestError(f"{kind} could not be compiled by xgrammar: {reason}") from None

    def _new_compiler(self) -> Any:
        import xgrammar

        from pdserve.shared.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(self._tokenizer_path, trust_remote_code=self._trust_remote_code)
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids or None
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler


def advance_over(grammars: list[TokenGrammar | None], tokens: list[int]) -> None:
    """Moves fresh matchers over tokens already generated (a moved request's `generated_ids`)."""
    for grammar in grammars:
        if grammar is not None:
            for token in tokens:
                if not grammar.accept(token):
                    break


def grammar_bitmask(reqs: list[Req], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """The batch's token bitmask [B, ceil(V/32)] int32 on `device`, None when no row is constrained.
    A finished row (its grammar terminated, or it was aborted, after the step was planned) keeps all
    ones: its token is dropped, and a terminated matcher has nothing to allow."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.is_finished]
    if not rows:
        return None
    bitmask = torch.full((len(reqs), -(-vocab_size // 32)), -1, dtype=torch.int32)
    for i in rows:
        reqs[i].grammar.fill(bitmask, i)  # type: ignore[union-attr]
    return bitmask.to(device, non_blocking=True)
