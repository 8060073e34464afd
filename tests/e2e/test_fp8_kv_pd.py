"""An fp8 KV cache across a P/D pair (prefill and decode engines in one process, fake KV transfer;
tiny random Llama, CPU), the zmq backend's page copies of an fp8 pool, and the pair whose pools
differ in dtype, which the transfer handshake refuses naming both.

The pages travel as the bytes they are stored as, so the pair reads the same fp8 values as the fp8
mixed engine: greedy tokens are identical and logprobs agree to 1e-5 (the two batch the requests
differently, which only reorders float32 sums: ~1e-7 seen).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
from pdserve.kvtransfer.layout import MessageSpec
from pdserve.kvtransfer.staging import gather_pages, scatter_pages
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from tests.helpers.pd_pair import PDPair
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}


def _args(model_dir: str, kv: str) -> EngineArgs:
    return EngineArgs(
        model_path=model_dir, device="cpu", dtype="float32", kv_cache_dtype=kv, chunked_prefill_size=16,
        max_total_tokens=2048,
    )  # fmt: skip


def _pair(model_dir: str, prefill_kv: str, decode_kv: str) -> PDPair:
    hub = FakeTransferHub()
    prefill = PrefillEngine(_args(model_dir, prefill_kv), lambda pool: FakeKVManager(pool, "prefill-0", hub))
    decode = DecodeEngine(_args(model_dir, decode_kv), lambda pool: FakeKVManager(pool, "decode-0", hub))
    return PDPair(prefill, decode)


def _close(pair: PDPair) -> None:
    pair.prefill.kv_manager.close()
    pair.decode.kv_manager.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.mark.parametrize("kv", ["fp8_e4m3", "fp8_e5m2"])
def test_pd_pair_with_fp8_pools_equals_the_mixed_engine(model_dir, kv):
    rng = random.Random(len(kv))
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (70, 33, 90)]  # > 2 pages each
    pair = _pair(model_dir, kv, kv)
    try:
        got = pair.generate(prompts, GREEDY, return_logprob=True)
        pair.assert_idle()
    finally:
        _close(pair)
    want = Engine(_args(model_dir, kv)).generate(prompts, GREEDY, return_logprob=True)
    for g, w in zip(got, want, strict=True):
        assert g["meta_info"]["finish_reason"]["type"] == "length", g
        assert g["output_ids"] == w["output_ids"]
        for (lp_g, _), (lp_w, _) in zip(
            g["meta_info"]["output_token_logprobs"], w["meta_info"]["output_token_logprobs"], strict=True
        ):
            assert abs(lp_g - lp_w) < 1e-5


def test_a_pair_whose_kv_dtypes_differ_is_refused_naming_both(model_dir):
    pair = _pair(model_dir, "fp8_e4m3", "fp8_e5m2")
    try:
        out = pair.generate([[7] * 70], GREEDY)[0]
        pair.assert_idle()  # the refused transfer leaves no page held on either side
    finally:
        _close(pair)
    finish = out["meta_info"]["finish_reason"]
    assert finish["type"] == "abort", out
    assert "KV transfer failed: KV cache dtype mismatch" in finish["message"]
    assert "float8_e4m3fn" in finish["message"] and "float8_e5m2" in finish["message"]


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_zmq_staging_moves_fp8_pages_as_bytes(fp8):
    shape = KVPoolShape(num_layers=2, num_pages=6, page_size=4, num_kv_heads=2, head_dim=8)
    src, dst = PagedKVPool(shape, fp8, "cpu"), PagedKVPool(shape, fp8, "cpu")
    src.kv.view(torch.uint8).copy_(torch.randint(0, 256, src.kv.shape, dtype=torch.uint8))
    spec = MessageSpec(first_page=0, num_pages=3, layer_begin=0, layer_end=2)
    staged = torch.empty((2, 2, 3, 4, 2, 8), dtype=fp8)
    gather_pages(src, [1, 4, 2], spec, staged)
    scatter_pages(dst, [5, 1, 3], spec, staged)
    for s, d in ((1, 5), (4, 1), (2, 3)):
        assert torch.equal(src.kv[:, :, s].view(torch.uint8), dst.kv[:, :, d].view(torch.uint8))
