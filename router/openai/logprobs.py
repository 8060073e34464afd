"""SGLang logprob entries -> the two OpenAI logprob shapes.

Input: entries `[logprob, token_id, token_text_or_None]` per token (SampleEvent's lists) and, per
token, a list of such entries for its top-k alternatives (or None). A missing token text is decoded
with the `decode` callable (`tokenizer.decode([id])`). The first prompt token has logprob None:
nothing predicts it.

- Completions (legacy) shape: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` with
  `top_logprobs` a list of `{token_text: logprob}` dicts; `text_offset` is each token's character
  offset in the choice's returned text (so offsets start after the prompt only when it is echoed).
  With `logprobs: 0` the top lists are empty, like SGLang.
- Chat shape: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}` with `bytes` the UTF-8 bytes of the token text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Decode = Callable[[int], str]
Entry = Sequence[Any]  # [logprob, token_id, token_text | None]


def token_text(entry: Entry, decode: Decode) -> str:
    text = entry[2] if len(entry) > 2 else None
    return text if text is not None else decode(int(entry[1]))


@dataclass
class CompletionLogprobs:
    """Accumulates the completions shape across events; `next_offset` continues `text_offset`.

    `with_top` False (`logprobs: 0`) keeps `top_logprobs` empty; True gives every token an entry,
    None where the generator sent no top list for it.
    """

    with_top: bool = False
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    next_offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def completion_logprobs(
    entries: Sequence[Entry],
    tops: Sequence[Sequence[Entry] | None] | None,
    decode: Decode,
    start_offset: int = 0,
    with_top: bool = True,
) -> CompletionLogprobs:
    """The completions shape for `entries` (one per token), offsets counted from `start_offset`."""
    out = CompletionLogprobs(with_top=with_top, next_offset=start_offset)
    extend_completion_logprobs(out, entries, tops, decode)
    return out


def extend_completion_logprobs(
    out: CompletionLogprobs,
    entries: Sequence[Entry],
    tops: Sequence[Sequence[Entry] | None] | None,
    decode: Decode,
) -> None:
    for i, entry in enumerate(entries):
        text = token_text(entry, decode)
        out.tokens.append(text)
        out.token_logprobs.append(entry[0])
        out.text_offset.append(out.next_offset)
        out.next_offset += len(text)
        if out.with_top:
            top = tops[i] if tops is not None and i < len(tops) else None
            out.top_logprobs.append(None if top is None else {token_text(t, decode): t[0] for t in top})


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs_content(
    entries: Sequence[Entry], tops: Sequence[Sequence[Entry] | None] | None, decode: Decode
) -> list[dict[str, Any]]:
    """The chat shape's `content` list for `entries`; no top lists asked -> `top_logprobs: []`."""
    content = []
    for i, entry in enumerate(entries):
        text = token_text(entry, decode)
        top = tops[i] if tops is not None and i < len(tops) else None
        content.append(
            {
                "token": text,
                "logprob": entry[0],
                "bytes": _bytes(text),
                "top_logprobs": [
                    {"token": (t_text := token_text(t, decode)), "logprob": t[0], "bytes": _bytes(t_text)}
                    for t in top or ()
                ],
            }
        )
    return content
