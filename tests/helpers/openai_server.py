"""The server the OpenAI API tests drive: one `worker --role mixed` (tiny random Llama, CPU, float32)
behind one `router --worker-addr`, the `openai` clients on it, and the native `/generate` oracle.

Import the fixtures into a test module (`from tests.helpers.openai_server import client, server`):
they are module-scoped, so each module that imports them starts its own worker and router.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import requests
from transformers import AutoTokenizer

from tests.helpers.tiny_models import make_tiny_model

MODEL_NAME = "tiny-llama"
CONTEXT = 1024  # the tiny model's max_position_embeddings
GREEDY = {"temperature": 0.0}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
PLAIN_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, worker_launcher, router_launcher) -> dict:
    model_dir = str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("tiny-llama"))))
    worker = worker_launcher(
        "--model-path", model_dir, "--dtype", "float32", "--device", "cpu",
        "--max-total-tokens", "4096", "--log-level", "warning",
    )  # fmt: skip
    router = router_launcher("--worker-addr", worker.zmq_address, "--served-model-name", MODEL_NAME)
    return {
        "url": router.url,
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
        "worker_addr": worker.zmq_address,
    }


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def templated_client(server, router_launcher, tmp_path_factory) -> openai.OpenAI:
    """A second router on the same worker, started with --chat-template <file>."""
    path = tmp_path_factory.mktemp("chat-template") / "plain.jinja"
    path.write_text(PLAIN_TEMPLATE)
    url = router_launcher(
        "--worker-addr",
        server["worker_addr"],
        "--chat-template",
        str(path),
        "--served-model-name",
        MODEL_NAME,
    ).url
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def native(server: dict, input_ids: list[int], sampling: dict, **extra) -> dict:
    resp = requests.post(
        server["url"] + "/generate",
        json={"input_ids": input_ids, "sampling_params": sampling, **extra},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat_ids(server: dict, messages=MESSAGES) -> list[int]:
    tok = server["tokenizer"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def finish_name(meta: dict) -> str:
    return meta["finish_reason"]["type"]


def stop_char(text: str) -> str:
    """A character of `text` (not its first, not U+FFFD) to use as a stop string."""
    for ch in text[1:]:
        if ch != "\ufffd" and ch.strip():
            return ch
    pytest.fail(f"no usable stop character in {text!r}")
