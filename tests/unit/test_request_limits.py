"""Bad input at the router's door: each case answers its 4xx in the OpenAI error shape, never a 500.

The HTTP cases run the real app (`build_app`, no worker behind it) in process: every refusal here
happens before a worker or the tokenizer is needed. The stop-string limits of `/generate` are
checked on `parse_generate` itself (the handler asks for the tokenizer first, so without a worker
it answers 503); tests/e2e/test_bad_input.py sends every case to a router with real workers.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from pdserve.router.app import build_app
from pdserve.router.http.auth import _matches
from pdserve.router.http.limits import MAX_JSON_DEPTH, is_json_content_type, json_too_deep
from pdserve.router.native.parse import parse_generate
from pdserve.router.openai.params import OpenAIRequestError, sampling_from_body
from pdserve.router.serving.generator_api import STATUS_TYPES, error_type
from pdserve.router.state import RouterArgs
from pdserve.router.text.stop_strings import (
    MAX_STOP_CHARS_TOTAL,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/tokenize")


def _send(requests: list[tuple[str, str, bytes, dict]], raw: list[bytes] = ()) -> list[tuple[int, dict]]:
    """(status, JSON body) of each (method, path, body, headers), then of each raw HTTP request."""

    async def run() -> list[tuple[int, dict]]:
        app = build_app(RouterArgs(api_key=KEY, max_body_bytes=1 << 20))
        async with TestClient(TestServer(app)) as client:
            out = []
            for method, path, body, headers in requests:
                # aiohttp would label bytes application/octet-stream
                headers = {**AUTH, "Content-Type": "application/json", **headers}
                resp = await client.request(method, path, data=body, headers=headers)
                out.append((resp.status, await resp.json()))
            for req in raw:
                reader, writer = await asyncio.open_connection(client.host, client.port)
                writer.write(req)
                await writer.drain()
                head, _, body = (await reader.read()).partition(b"\r\n\r\n")
                writer.close()
                out.append((int(head.split()[1]), json.loads(body)))
            return out

    return asyncio.run(run())


def _assert_error(answer: tuple[int, dict], status: int, *words: str) -> None:
    code, body = answer
    assert code == status, body
    assert body["object"] == "error" and body["code"] == status, body
    assert body["type"] == error_type(status) and body["type"] != "Error", body
    for word in words:
        assert word in body["message"], body["message"]


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


# ---------------------------------------------------------------------- deep nesting


def test_deep_nesting_is_400_not_500():
    too_deep = [
        b'{"text": ' + _nested(10_000) + b"}",  # past the parser's recursion limit
        b'{"text": "a", "sampling_params": {"custom_params": {"x": ' + _nested(300) + b"}}}",  # parses
        _nested(10_000),  # not even an object
    ]
    cases = [("POST", path, body, {}) for path in JSON_ROUTES for body in too_deep]
    for answer in _send(cases):
        _assert_error(answer, 400, "Malformed JSON body", "nested too deeply")


def test_depth_limit_is_exact():
    assert not json_too_deep(json.loads(_nested(MAX_JSON_DEPTH)))
    assert json_too_deep(json.loads(_nested(MAX_JSON_DEPTH + 1)))
    assert json_too_deep({"a": [1, {"b": json.loads(_nested(MAX_JSON_DEPTH - 2))}]})
    assert not json_too_deep({"a": [1, {"b": json.loads(_nested(MAX_JSON_DEPTH - 3))}]})
    assert not json_too_deep("text") and not json_too_deep([[1] * 100_000])


def test_many_brackets_below_the_depth_limit_pass():
    body = json.dumps({"input_ids": [[1, 2]] * 200, "sampling_params": {"max_new_tokens": 1}}).encode()
    ((status, answer),) = _send([("POST", "/generate", body, {})])
    assert "nested" not in answer["message"]  # refused later, for want of a worker
    assert status == 503, answer


# ---------------------------------------------------------------------- authorization bytes


def test_non_ascii_bearer_is_401():
    raw = [
        b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token + b"\r\nContent-Length: 13\r\n\r\n" + b'{"text": "a"}'
        for token in (b"\xff\xfe\xfd", "clé".encode(), "clé".encode("latin-1"), b"\xed\xa0\x80")
    ]
    for answer in _send([], raw):
        _assert_error(answer, 401, "the API key is wrong")


def test_keys_compare_whatever_their_characters():
    assert _matches("clé\udcff", "clé\udcff")
    assert not _matches("\udcff", KEY) and not _matches("\ud800", "\ud801")
    assert not _matches(None, KEY) and not _matches(KEY, None)


# ---------------------------------------------------------------------- content type


@pytest.mark.parametrize(
    "header, is_json",
    [
        (None, True),
        ("", True),
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("application/merge-patch+json ; charset=UTF-8", True),
        ("text/plain", False),
        ("text/json", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonp", False),
        ("application/octet-stream", False),
    ],
)
def test_json_content_types(header, is_json):
    assert is_json_content_type(header) is is_json


def test_non_json_content_type_is_415_before_the_body_is_read():
    body = json.dumps({"text": "a"}).encode()
    cases = [
        ("POST", path, payload, {"Content-Type": kind})
        for path in JSON_ROUTES
        for kind in ("text/plain", "application/x-www-form-urlencoded")
        for payload in (body, b"")
    ]
    for answer in _send(cases):
        _assert_error(answer, 415, "Unsupported Content-Type", "application/json")


def test_json_content_types_are_parsed():
    cases = [
        ("POST", "/v1/completions", b"{}", {"Content-Type": kind})
        for kind in ("application/json; charset=utf-8", "application/vnd.api+json", "")
    ]
    no_header = (  # `requests.post(data=...)` sends no type
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    for answer in _send(cases, [no_header]):
        _assert_error(answer, 400, "prompt is required")


# ---------------------------------------------------------------------- other malformed bodies


def test_malformed_bodies_are_400():
    bodies = [
        (b'{"text": "\xff\xfe"}', "Malformed JSON body"),  # not UTF-8
        (b"\xc3\x28", "Malformed JSON body"),
        (b'{"text": ', "Malformed JSON body"),
        (b"  ", "empty"),
        (b"[1, 2]", "JSON object"),
    ]
    cases = [("POST", "/generate", body, {}) for body, _ in bodies]
    for answer, (_, words) in zip(_send(cases), bodies, strict=True):
        _assert_error(answer, 400, words)


def test_unknown_route_and_method_have_typed_errors():
    answers = _send(
        [("GET", "/no_such_route", b"", {}), ("GET", "/generate", b"", {}), ("DELETE", "/v1/models", b"", {})]
    )
    _assert_error(answers[0], 404, "Not found")
    _assert_error(answers[1], 405, "not allowed")
    _assert_error(answers[2], 405, "not allowed")
    assert answers[1][1]["type"] == "MethodNotAllowedError"


def test_every_status_has_a_named_type():
    for status in (400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 499, 500, 502, 503, 504):
        assert (
            status in STATUS_TYPES
            and STATUS_TYPES[status].endswith("Error")
            and STATUS_TYPES[status] != "Error"
        )
    assert error_type(418) == "BadRequestError" and error_type(507) == "InternalServerError"


# ---------------------------------------------------------------------- stop limits


def _native(sampling: dict) -> None:
    parse_generate({"input_ids": [1, 2], "sampling_params": sampling}, lambda t: [1], max_batch_size=8)


def _openai(body: dict) -> None:
    sampling_from_body(body, 8)


OVER_LIMITS = [
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, f"limit of {MAX_STOP_STRINGS}", "stop"),
    ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, f"limit of {MAX_STOP_STRING_CHARS}", "stop"),
    ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, f"limit of {MAX_STOP_STRING_CHARS}", "stop"),
    ({"stop": ["x" * 1000] * 17}, f"limit of {MAX_STOP_CHARS_TOTAL}", "stop"),
    ({"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, f"limit of {MAX_STOP_TOKEN_IDS}", "stop_token_ids"),
    ({"stop": ["s"] * 100_000}, "100000 stop strings", "stop"),
]


@pytest.mark.parametrize("fields, words, param", OVER_LIMITS)
def test_stop_limits_native(fields, words, param):
    with pytest.raises(Exception) as info:
        _native(fields)
    assert info.value.status == 400 and words in info.value.message
    assert info.value.message.startswith(f"sampling_params.{param}")


@pytest.mark.parametrize("fields, words, param", OVER_LIMITS)
def test_stop_limits_openai(fields, words, param):
    with pytest.raises(OpenAIRequestError) as info:
        _openai(fields)
    assert info.value.status == 400 and words in info.value.message and info.value.param == param


def test_stop_lists_at_the_limits_pass():
    at_limits = [
        {"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS)]},
        {"stop": ["x" * MAX_STOP_STRING_CHARS] * (MAX_STOP_CHARS_TOTAL // MAX_STOP_STRING_CHARS)},
        {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
    ]
    for fields in at_limits:
        _native(fields)
        _openai(fields)
