"""HTTP helpers for tests that talk to a router the way a client does (requests, SSE, error shape)."""

from __future__ import annotations

import json

import requests

API_KEY, ADMIN_KEY = "test-key", "admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def post(url: str, path: str, body, headers=AUTH, **kw) -> requests.Response:
    return requests.post(url + path, json=body, headers=headers, timeout=120, **kw)


def sse_chunks(resp: requests.Response) -> list:
    """The JSON chunks of an SSE response, checking the framing; the last item is "[DONE]"."""
    chunks = []
    for block in resp.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        chunks.append(payload if payload == "[DONE]" else json.loads(payload))
    assert chunks[-1] == "[DONE]" and "[DONE]" not in chunks[:-1]
    return chunks


def assert_error(resp: requests.Response, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["object"] == "error" and body["code"] == status, body
    for word in words:
        assert word in body["message"], body["message"]
    return body["message"]
