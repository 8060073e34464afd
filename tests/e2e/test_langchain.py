"""LangChain's OpenAI models, unchanged, against a real router and worker (tests/helpers/openai_server.py):
ChatOpenAI (invoke with usage, stream with usage, batch, async, stop) and OpenAI (invoke, stream)
give the text the `openai` client and the native `/generate` give."""

from __future__ import annotations

import asyncio

import pytest

# the fixtures come from the helper module: test arguments that name them are not redefinitions
# ruff: noqa: F811
from tests.helpers.openai_server import (  # noqa: F401 (fixtures)
    GREEDY,
    MESSAGES,
    MODEL_NAME,
    client,
    native,
    server,
    stop_char,
)

pytestmark = [pytest.mark.slow, pytest.mark.untimed]


def test_langchain_chat_model_invoke_stream_batch_and_async(server, client):
    """LangChain's ChatOpenAI, unchanged, on the router: the same text as the openai client."""
    from langchain_core.messages import AIMessage
    from langchain_openai import ChatOpenAI

    ref = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, **GREEDY)
    text = ref.choices[0].message.content
    chat = ChatOpenAI(
        base_url=server["url"] + "/v1", api_key="unused", model=MODEL_NAME, temperature=0.0,
        max_tokens=10, max_retries=0, timeout=60, stream_usage=True,
    )  # fmt: skip
    messages = [(m["role"], m["content"]) for m in MESSAGES]
    answer = chat.invoke(messages)
    assert isinstance(answer, AIMessage) and answer.content == text
    assert answer.response_metadata["finish_reason"] == ref.choices[0].finish_reason
    assert answer.response_metadata["model_name"] == MODEL_NAME
    usage = answer.usage_metadata
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        ref.usage.prompt_tokens,
        ref.usage.completion_tokens,
    )

    chunks = list(chat.stream(messages))
    assert "".join(c.content for c in chunks) == text
    streamed_usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert [u["output_tokens"] for u in streamed_usage] == [ref.usage.completion_tokens]

    other = [("user", "Count to three.")]
    first, second = chat.batch([messages, other])
    assert first.content == text and second.content == chat.invoke(other).content
    assert asyncio.run(chat.ainvoke(messages)).content == text

    stop = stop_char(text)
    assert chat.invoke(messages, stop=[stop]).content == text[: text.index(stop)]


def test_langchain_completion_model_equals_native(server):
    from langchain_openai import OpenAI

    prompt = "The colours of the sea are"
    ids = server["tokenizer"].encode(prompt)
    ref = native(server, ids, {**GREEDY, "max_new_tokens": 8})
    llm = OpenAI(
        base_url=server["url"] + "/v1", api_key="unused", model=MODEL_NAME, temperature=0.0,
        max_tokens=8, max_retries=0, timeout=60,
    )  # fmt: skip
    assert llm.invoke(prompt) == ref["text"]
    assert "".join(llm.stream(prompt)) == ref["text"]
