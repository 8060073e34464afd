"""Encoding ASCII text for byte-level BPE tokenizers (GPT-2's scheme: SmolLM2, ...) without the Rust
pipeline's pre-tokenizer, giving the same ids.

    bpe = AsciiByteLevelBPE.of(tokenizer._tokenizer, add_special_tokens=True)  # None: not this scheme
    ids = bpe.encode(text)                           # text.isascii() only

Why: the router encodes every text prompt on the request path, and `tokenizers` spends most of an
encode in its pre-tokenizer (ByteLevel's regex over a string that tracks offsets per byte): on the
dev box 150 of the 190 µs a 128-token prompt costs. The same split with Python's `re`, and the BPE
of each piece from a cache (the model itself for a piece not seen yet), takes about 50 µs.

Rules:
- `of` gives an encoder only for a backend with no normalizer; a pre-tokenizer that is ByteLevel
  (no prefix space, GPT-2's regex), alone or after Digits(individual_digits=True); a BPE model
  without dropout; added tokens without lstrip, rstrip or single_word; a post-processor that is
  none, ByteLevel, TemplateProcessing (its single template) or a Sequence of those. Anything else
  gives None (the caller keeps the backend's own encode);
- `encode(text)` takes ASCII text only, where GPT-2's classes (\\s, \\p{L}, \\p{N}) are exactly
  [\\t\\n\\v\\f\\r ], [A-Za-z] and [0-9], so the split equals the Rust one; it does what the
  pipeline does: added tokens out first (those not normalized, then the normalized ones, each
  leftmost-longest), digits isolated (with Digits), GPT-2's pieces, each piece's bytes mapped
  to ByteLevel's characters and given to the model, then the template's special tokens;
- special tokens given as text are matched (split_special_tokens off: the caller checks that the
  backend says so); the BPE of a piece never changes (no dropout), so pieces are cached, up to
  CACHE_SIZE of them, then the cache starts over;
- the backend is not changed after `of` (the router never changes it); `matches(backend)` checks
  cheaply the one change a caller might make, new added tokens (the vocabulary size grows).
"""

from __future__ import annotations

import json
import re
from typing import Any

CACHE_SIZE = 1 << 16  # pieces; English text has far fewer distinct ones

_WS = "\\t\\n\\x0b\\x0c\\r "
# tokenizers' ByteLevel regex, 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
# with its classes cut to ASCII (Oniguruma's \s is Unicode White_Space: in ASCII, 9-13 and space)
_PIECES = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
_DIGIT = re.compile("([0-9])")  # Digits(individual_digits=True) isolates each digit


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> character table (ByteLevel's alphabet), for the ASCII bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: c for b, c in table.items() if b < 128}


_ASCII_TO_BYTE_LEVEL = _byte_level_chars()


def _component(obj: Any) -> dict[str, Any] | None:
    return None if obj is None else json.loads(obj.__getstate__())


def _is_byte_level_split(cfg: dict[str, Any]) -> bool:
    return cfg.get("type") == "ByteLevel" and not cfg.get("add_prefix_space") and cfg.get("use_regex", True)


def _pre_tokenizer_digits(cfg: dict[str, Any] | None) -> bool | None:
    """Whether digits are isolated first (True/False), or None for a pre-tokenizer not supported."""
    if cfg is None:
        return None
    if _is_byte_level_split(cfg):
        return False
    parts = cfg.get("pretokenizers") if cfg.get("type") == "Sequence" else None
    if (
        parts is not None
        and len(parts) == 2
        and parts[0] == {"type": "Digits", "individual_digits": True}
        and _is_byte_level_split(parts[1])
    ):
        return True
    return None


def _template(cfg: dict[str, Any] | None) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) the text that the post-processor adds, or None if not supported."""
    if cfg is None or cfg.get("type") == "ByteLevel":
        return [], []
    if cfg.get("type") == "Sequence":
        found = [_template(p) for p in cfg.get("processors", [])]
        real = [t for t in found if t != ([], [])]
        if any(t is None for t in found) or len(real) > 1:
            return None
        return real[0] if real else ([], [])
    if cfg.get("type") != "TemplateProcessing":
        return None
    before: list[int] = []
    after: list[int] = []
    seen_text = False
    for item in cfg.get("single", []):
        if "Sequence" in item and item["Sequence"].get("id") == "A" and not seen_text:
            seen_text = True
        elif "SpecialToken" in item:
            special = cfg.get("special_tokens", {}).get(item["SpecialToken"]["id"])
            if special is None:
                return None
            (after if seen_text else before).extend(special["ids"])
        else:
            return None
    return (before, after) if seen_text else None


def _alternation(contents: list[str]) -> re.Pattern | None:
    """Leftmost-longest matching of the contents (longer ones first in the alternation)."""
    if not contents:
        return None
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


class AsciiByteLevelBPE:
    def __init__(
        self,
        model: Any,
        digits: bool,
        added: dict[str, int],
        raw_added: list[str],
        normalized_added: list[str],
        template: tuple[list[int], list[int]],
        vocab_size: int,
    ):
        self._model = model
        self._digits = digits
        self._added = added
        self._raw_added = _alternation(raw_added)
        self._normalized_added = _alternation(normalized_added)
        self._before, self._after = template
        self._vocab_size = vocab_size
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def of(cls, backend: Any, add_special_tokens: bool = True) -> AsciiByteLevelBPE | None:
        """The encoder for a `tokenizers.Tokenizer` of the supported kind (module docstring), else None."""
        try:
            if backend.normalizer is not None:
                return None
            digits = _pre_tokenizer_digits(_component(backend.pre_tokenizer))
            model = backend.model
            if digits is None or type(model).__name__ != "BPE" or model.dropout not in (None, 0.0):
                return None
            template = _template(_component(backend.post_processor)) if add_special_tokens else ([], [])
            if template is None:
                return None
            tokens = backend.get_added_tokens_decoder()
        except (AttributeError, TypeError, ValueError, KeyError):  # another tokenizers layout
            return None
        if any(t.lstrip or t.rstrip or t.single_word for t in tokens.values()):
            return None
        added = {t.content: i for i, t in tokens.items()}
        raw = [t.content for t in tokens.values() if not t.normalized]
        normalized = [t.content for t in tokens.values() if t.normalized]
        return cls(model, digits, added, raw, normalized, template, backend.get_vocab_size(True))

    def matches(self, backend: Any) -> bool:
        """False when tokens were added to the backend since: this encoder is out of date."""
        return backend.get_vocab_size(True) == self._vocab_size

    def encode(self, text: str) -> list[int]:
        """The backend's ids for ASCII `text` (see the module docstring)."""
        ids = list(self._before)
        self._added_split(text, self._raw_added, self._after_raw, ids)
        ids += self._after
        return ids

    def _added_split(self, text: str, pattern: re.Pattern | None, rest, ids: list[int]) -> None:
        """Added tokens matching `pattern` become their ids; the text between them goes to `rest`."""
        if pattern is None:
            rest(text, ids)
            return
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                rest(text[start : match.start()], ids)
            ids.append(self._added[match.group()])
            start = match.end()
        if start < len(text):
            rest(text[start:], ids)

    def _after_raw(self, text: str, ids: list[int]) -> None:
        self._added_split(text, self._normalized_added, self._pieces, ids)

    def _pieces(self, text: str, ids: list[int]) -> None:
        if not self._digits:
            for piece in _PIECES.findall(text):
                ids += self._bpe(piece)
            return
        for k, run in enumerate(_DIGIT.split(text)):
            if k % 2:  # a digit, alone
                ids += self._bpe(run)
            elif run:
                for piece in _PIECES.findall(run):
                    ids += self._bpe(piece)

    def _bpe(self, piece: str) -> list[int]:
        ids = self._cache.get(piece)
        if ids is None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            ids = [t.id for t in self._model.tokenize(piece.translate(_ASCII_TO_BYTE_LEVEL))]
            self._cache[piece] = ids
        return ids
