"""Incremental detokenization: token ids arrive a few at a time, text leaves as soon as it is final.

Rules:
- the concatenation of everything `add()` returned plus `finish()` equals
  `tokenizer.decode(all_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`;
- text ending in U+FFFD (a multi-byte character cut between tokens) is held back until the next
  token completes it, or until `finish()`, which releases whatever is left as the tokenizer decodes it;
- each step decodes two short windows of ids, never the whole sequence, so a long stream costs
  O(1) per token.

Why windows: decoding a token alone loses context that tokenizers use (SentencePiece drops the
leading space of a sequence's first piece; byte-level BPE splits characters across tokens). The
window `ids[prefix:]` starts a few tokens back, at text already emitted, and the new text is what
the window decodes beyond that already-emitted prefix.

Tokenizer cleanup (`clean_up_tokenization_spaces`) is always off: it rewrites " ." into "." and
would make the streamed text differ from the generated tokens; /detokenize follows the same rule.
"""

from __future__ import annotations

from typing import Any

from pdserve.router.text.tokenizer_fast import Decoder, fast_decoder

REPLACEMENT_CHAR = "\ufffd"


def decode_ids(tokenizer: Any, ids: list[int], skip_special_tokens: bool = True) -> str:
    """The router's one way to turn ids into text (no cleanup, see the module docstring)."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Detokenizes one output sequence. Not shared between samples or requests.

    `decoder` (from `fast_decoder(tokenizer)`) may be passed in, so that many detokenizers of one
    tokenizer share it."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, decoder: Decoder | None = None):
        self._decoder = decoder or fast_decoder(tokenizer)
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # all text released so far
        self._prefix = 0  # start of the decode window: text of ids[_prefix:_read] is already out
        self._read = 0  # ids before this have been turned into released text

    def _decode(self, ids: list[int]) -> str:
        return self._decoder(ids, self._skip)

    def add(self, new_ids: list[int]) -> str:
        """Appends ids; returns the text that became final (possibly "")."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        window_text = self._decode(self.ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new, or an incomplete character: wait for more ids
        delta = window_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Releases the held-back rest (an incomplete character decodes as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        window_text = self._decode(self.ids[self._prefix :])
        delta = window_text[len(prefix_text) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
