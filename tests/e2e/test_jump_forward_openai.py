"""Jump-forward decoding end to end: a real `worker` (SmolLM2-135M-Instruct, whose BPE tokenizer
makes the token boundary matter) started with `--enable-jump-forward` behind a real `router`, driven by the `openai` package with
response_format json_schema. Greedy answers validate, streaming gives the same text and usage as
not streaming, native /generate's text is its output_ids decoded, and the worker's counters show
that forced tokens were jumped, not decoded one step each."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests
from transformers import AutoTokenizer

from pdserve.shared.models.resolver import resolve_model
from tests.helpers.cluster_waits import wait_until

pytestmark = pytest.mark.untimed

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "membership_status": {"const": "active member of the photography club"},
        "favourite_colour": {"enum": ["ultramarine blue", "burnt sienna"]},
    },
    "required": ["name", "membership_status", "favourite_colour"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "member", "strict": True, "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Describe a club member as JSON."}]


@pytest.fixture(scope="module")
def stack(worker_launcher, router_launcher) -> dict:
    worker = worker_launcher(
        "--model-path", SMOL, "--enable-jump-forward", "--max-total-tokens", "4096", "--log-level", "warning"
    )  # fmt: skip
    router = router_launcher("--worker-addr", worker.zmq_address)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return {"url": router.url, "worker": worker.http_url, "client": client}


def _counter(stack: dict, name: str) -> float:
    text = requests.get(stack["worker"] + "/metrics", timeout=30).text
    match = re.search(rf"^pdserve_worker_{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the worker's metrics"
    return float(match.group(1))


def test_json_schema_chat_jumps_and_streams_the_same_text(stack):
    client = stack["client"]
    jumped, decoded = _counter(stack, "jump_forward_tokens"), _counter(stack, "decode_tokens_computed")
    resp = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=100, temperature=0.0, response_format=FORMAT
    )
    (choice,) = resp.choices
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, SCHEMA)
    completion_tokens = resp.usage.completion_tokens

    wait_until(lambda: _counter(stack, "jump_forward_tokens") > jumped, 10.0, "the worker's jump count")
    rows = _counter(stack, "decode_tokens_computed") - decoded
    # stepping would take one decode row per token after the first; the forced text took none
    assert rows < completion_tokens - 1 - 10, (rows, completion_tokens)

    stream = client.chat.completions.create(
        model="default", messages=MESSAGES, max_tokens=100, temperature=0.0, response_format=FORMAT,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage, finish = "", None, None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "stop" and text == choice.message.content
    assert usage is not None and usage.completion_tokens == completion_tokens


@pytest.mark.parametrize("max_new_tokens", [7, 19, 200])
def test_native_text_is_the_output_ids_decoded(stack, max_new_tokens):
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(SMOL).local_dir))
    body = {
        "text": "A club member as JSON: ",
        "sampling_params": {
            "temperature": 0.0,
            "max_new_tokens": max_new_tokens,
            "json_schema": json.dumps(SCHEMA),
        },
    }
    out = requests.post(stack["url"] + "/generate", json=body, timeout=120).json()
    ids, meta = out["output_ids"], out["meta_info"]
    assert len(ids) == meta["completion_tokens"] <= max_new_tokens
    assert out["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    if meta["finish_reason"]["type"] == "stop":
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    else:
        assert meta["finish_reason"]["type"] == "length" and len(ids) == max_new_tokens
