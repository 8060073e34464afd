"""Reasoning in a model's output: `<think>...</think>` split from the answer (`--reasoning-parser`).

    split = analyze_reasoning("<think>Plan.</think>Answer.", QWEN3, final=True)
    split.reasoning, split.content  # "Plan.", "Answer."

Rules (SGLang's reasoning parsers; one pure function for the non-streaming answer and each
streaming step, so that streamed pieces assemble to exactly the non-streaming split):
- `qwen3`: reasoning only when the output opens with `<think>` (blanks before it allowed);
  otherwise all of it is content.
- `deepseek-r1`: the output starts inside the reasoning (its chat template opens the block), so
  everything up to `</think>` is reasoning; a leading `<think>` is dropped when the model writes one.
- Reasoning without its closing tag (max_tokens reached while thinking) is all reasoning.
- Reasoning is stripped of blanks at both ends, content of blanks at its start.
- While not final, what may still be a tag or the blanks around one is held back.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.router.text.json_scan import skip_ws


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str = "<think>"
    end: str = "</think>"
    starts_inside: bool = False  # the output begins inside the reasoning block


QWEN3 = ReasoningFormat("qwen3")
DEEPSEEK_R1 = ReasoningFormat("deepseek-r1", starts_inside=True)
REASONING_FORMATS = {f.name: f for f in (QWEN3, DEEPSEEK_R1)}


def reasoning_format(name: str) -> ReasoningFormat:
    if name not in REASONING_FORMATS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_FORMATS)}")
    return REASONING_FORMATS[name]


@dataclass
class ReasoningSplit:
    reasoning: str
    content: str
    in_reasoning: bool  # the output so far opened a reasoning block (content None when nothing after it)


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` are a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def analyze_reasoning(text: str, fmt: ReasoningFormat, final: bool) -> ReasoningSplit:
    first = skip_ws(text, 0)
    opens = text.startswith(fmt.start, first)
    if not opens and not final and fmt.start.startswith(text[first:]):
        return ReasoningSplit("", "", fmt.starts_inside)  # may still be the opening tag
    if opens:
        body_at = first + len(fmt.start)
    elif fmt.starts_inside:
        body_at = 0
    else:
        return ReasoningSplit("", text, False)
    end = text.find(fmt.end, body_at)
    if end < 0:
        body = text[body_at:]
        if not final:
            body = body[: len(body) - _partial_tag(body, fmt.end)]
        return ReasoningSplit(body.strip(), "", True)
    return ReasoningSplit(text[body_at:end].strip(), text[end + len(fmt.end) :].lstrip(), True)
