"""HTTP helpers for tests that talk to a router the way a client does (requests, SSE, error shape)."""

from __future__ import annotations

import json

import requests

API_KEY, ADMIN_KEY = "test-key", "admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def post(url: str, path: str, body, headers=AUTH, **kw) -> requests.Response:
    return requests.post(url + path, json=body, headers=headers, timeout=120, **kw)


def greedy_generate(url: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """(output ids, their logprobs) of a greedy native /generate of `prompt` (no API key)."""
    body = {
        "input_ids": prompt,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens},
        "return_logprob": True,
    }
    resp = requests.post(url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    return out["output_ids"], [row[0] for row in out["meta_info"]["output_token_logprobs"]]


def served_output_ids(url: str, prompts: list[list[int]], sampling_params: dict) -> list[list[int]]:
    """Each prompt's output ids from `/generate`, one request at a time."""
    outs = []
    for prompt in prompts:
        resp = requests.post(
            url + "/generate", json={"input_ids": prompt, "sampling_params": sampling_params}, timeout=60
        )
        assert resp.status_code == 200, resp.text
        outs.append(resp.json()["output_ids"])
    return outs


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


def assert_native_stream_grows(events: list, num_tokens: int) -> None:
    """A native stream's events (without [DONE]): each one's output_ids extend the one before (one
    token per event, or several when the router caught up with a backlog, as SGLang streams do),
    completion_tokens counts them, and the last holds all `num_tokens`."""
    assert 1 <= len(events) <= num_tokens
    final = events[-1]["output_ids"]
    assert len(final) == num_tokens
    seen = 0
    for event in events:
        ids = event["output_ids"]
        assert len(ids) > seen and ids == final[: len(ids)], (seen, ids)
        assert event["meta_info"]["completion_tokens"] == len(ids)
        seen = len(ids)
