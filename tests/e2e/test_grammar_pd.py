"""Constrained decoding across a P/D pair (prefill and decode engines in one process, fake KV
transfer; tiny random Llama, CPU): the prefill side samples the first token under the grammar, the
decode side's matcher starts from the prompt, advances over that token and goes on. Seeded sampled
output equals the mixed engine's token for token, and it validates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.pd_pair import PDPair
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["id", "tags"],
}
PROMPTS = [[ord(c) for c in f"Record {i}: "] * (1 + i) for i in range(4)]


def _args(model_dir: str) -> EngineArgs:
    return EngineArgs(
        model_path=model_dir, device="cpu", dtype="float32", chunked_prefill_size=16, max_total_tokens=4096
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.fixture(scope="module")
def pair(model_dir):
    hub = FakeTransferHub()
    prefill = PrefillEngine(_args(model_dir), lambda pool: FakeKVManager(pool, "prefill-0", hub))
    decode = DecodeEngine(_args(model_dir), lambda pool: FakeKVManager(pool, "decode-0", hub))
    yield PDPair(prefill, decode)
    prefill.kv_manager.close()
    decode.kv_manager.close()


def _text(out: dict) -> str:
    ids = out["output_ids"]
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        ids = ids[:-1]
    return bytes(ids).decode("utf-8")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pd_json_schema_equals_mixed_and_validates(pair, model_dir, seed):
    params = {
        "temperature": 1.0,
        "sampling_seed": seed,
        "max_new_tokens": 120,
        "json_schema": json.dumps(SCHEMA),
    }
    got = pair.generate(PROMPTS, params)
    want = Engine(_args(model_dir)).generate(PROMPTS, [params] * len(PROMPTS)) if seed == 0 else None
    for i, out in enumerate(got):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(_text(out)), SCHEMA)
        if want is not None:
            assert out["output_ids"] == want[i]["output_ids"]
    pair.assert_idle()


def test_pd_grammar_ending_at_the_first_token(pair):
    """A grammar whose first token completes it ends at the decode side's first token check."""
    out = pair.generate(PROMPTS[:2], {"temperature": 1.0, "max_new_tokens": 8, "regex": "[xyz]"})
    for o in out:
        assert re.fullmatch("[xyz]", _text(o)) and o["meta_info"]["finish_reason"]["type"] == "stop"
    pair.assert_idle()
