"""Chat messages -> prompt text through a Jinja chat template.

Rules:
- Messages are system/user/assistant/tool (`developer`, OpenAI's newer name for system, becomes
  `system`); content is a string or a list of `{"type": "text"}` parts, joined with newlines. Other
  part types (images, audio, files) answer 400: the served models take text only. Tool calls and
  tool results keep their fields (router/openai/tool_template.py).
- The template is `--chat-template` when given (RouterState reads the file at start-up), else the
  tokenizer's own; neither -> 400 naming the flag.
- The prompt is rendered with `add_generation_prompt=True` (the assistant turn is opened) and then
  tokenized without adding special tokens: the template writes them, as `apply_chat_template` does.
"""

from __future__ import annotations

from typing import Any

from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.tool_template import tool_message_fields

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _content_text(content: Any, i: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role in ("assistant", "tool"):
        return ""
    if not isinstance(content, list):
        raise OpenAIRequestError(
            f"messages[{i}].content must be a string or a list of content parts.", "messages"
        )
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise OpenAIRequestError(
                f"messages[{i}].content: part type {kind!r} is not supported; the served model takes "
                "text parts ({'type': 'text', 'text': ...}) only.",
                "messages",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_messages(raw: Any) -> list[dict[str, Any]]:
    """Validated `messages` as `[{"role", "content", tool fields}]` with string content; raises
    OpenAIRequestError."""
    if raw is None:
        raise OpenAIRequestError("messages is required.", "messages")
    if not isinstance(raw, list) or not raw:
        raise OpenAIRequestError("messages must be a non-empty list of messages.", "messages")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise OpenAIRequestError(f"messages[{i}] must be an object.", "messages")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:  # an object or a list is not hashable
            raise OpenAIRequestError(
                f"messages[{i}].role {role!r} is not supported; use system, user, assistant or tool.",
                "messages",
            )
        text = _content_text(msg.get("content"), i, role)
        out.append({"role": ROLES[role], "content": text, **tool_message_fields(msg, i)})
    return out


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str | None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text of `messages`; `template` None uses the tokenizer's own chat template."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise OpenAIRequestError(
            "The served model's tokenizer has no chat template; start the router with --chat-template "
            "or use /v1/completions.",
            "messages",
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja raises whatever the template raises (raise_exception, TypeError, ...)
        raise OpenAIRequestError(
            f"The chat template could not render these messages: {exc}", "messages"
        ) from exc
    if not isinstance(text, str):
        raise OpenAIRequestError("The chat template did not render text.", "messages")
    return text


def chat_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text; the template already wrote any BOS/special tokens."""
    return tokenizer.encode(text, add_special_tokens=False)
