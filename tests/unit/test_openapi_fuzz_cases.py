"""Bodies the schema-driven fuzzer (tests/e2e/test_openapi_fuzz.py) found answered 5xx, kept as
regression cases: each must be a 400 naming its field."""

from __future__ import annotations

import pytest

from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.protocol import parse_chat_request


@pytest.mark.parametrize("role", [{}, [], ["user"], 1, None])
def test_chat_message_role_of_any_type_is_a_400(role):
    body = {"messages": [{"role": role, "content": None, "name": ""}]}
    with pytest.raises(OpenAIRequestError) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and info.value.param == "messages"
    assert "role" in info.value.message
