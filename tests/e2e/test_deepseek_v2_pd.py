"""DeepSeek-V2 across a P/D pair (prefill and decode engines in one process, CPU, float32): the
compressed KV pages (one plane of kv_lora_rank + qk_rope_head_dim per token and layer) move from
the prefill pool to the decode pool chunk by chunk, through the fake backend and through zmq
over loopback, and the greedy tokens equal transformers' generate. The tiny V2-shaped model
(tests/helpers/tiny_deepseek.py) has q LoRA, yarn rope, group-limited routing, a dense first
layer and shared experts; V2-Lite's shape goes through the fake backend too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer import make_kv_manager
from pdserve.kvtransfer.fake import FakeTransferHub
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.pd_pair import PDPair
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NEW_TOKENS = 10
PROMPTS = [[(7 * i + 3 * n) % 250 for i in range(n)] for n in (1, 9, 21, 40)]


def _args(model_dir: str) -> EngineArgs:
    # chunks of 16 tokens over pages of 4: a long prompt's pages leave in several sends
    return EngineArgs(
        model_path=model_dir, device="cpu", dtype="float32", chunked_prefill_size=16, page_size=4,
        max_total_tokens=2048,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "backend"), [("deepseek_v2_yarn", "fake"), ("deepseek_v2_yarn", "zmq"), ("deepseek_v2", "fake")]
)
def test_pd_pair_greedy_matches_hf(kind: str, backend: str, tmp_path: Path):
    model_dir = str(make_tiny_model(kind, tmp_path / kind))
    expected = [ids for ids, _ in hf_greedy(model_dir, PROMPTS, NEW_TOKENS)]
    assert any(len(set(ids)) > 2 for ids in expected)
    options = {"hub": FakeTransferHub()} if backend == "fake" else {}
    prefill = PrefillEngine(
        _args(model_dir), lambda pool: make_kv_manager(backend, pool, "prefill-0", **options)
    )
    decode = DecodeEngine(
        _args(model_dir), lambda pool: make_kv_manager(backend, pool, "decode-0", **options)
    )
    try:
        for engine in (prefill, decode):
            assert engine.runner.pool.kv.shape[1] == 1 and engine.runner.pool.kv.shape[-1] == 32 + 8
        pair = PDPair(prefill, decode)
        outs = pair.generate(PROMPTS, {"temperature": 0.0, "max_new_tokens": NEW_TOKENS})
        assert [out["output_ids"] for out in outs] == expected
        assert len(pair.done) == len(PROMPTS) and all(done.ok for done in pair.done.values())
        pair.assert_idle()
    finally:
        prefill.kv_manager.close()
        decode.kv_manager.close()
