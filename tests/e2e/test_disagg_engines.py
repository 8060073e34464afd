"""Prefill and decode engines in one process over two separate KV pools, the fake transfer backend
between them (tiny random Llama, CPU, float32).

1. Parity: for a batch of prompts (short, long over many 16-token chunks, repeated prefixes), greedy
   output equals the mixed Engine's token for token; output and prompt logprobs (top lists too)
   equal within 1e-5.
2. Aborts at each stage (queued at P, mid-prefill, mid-transfer, waiting at D, decoding) leave every
   page free on both sides (load reports, page bookkeeping) and no request behind.
3. A transfer failure (P aborts its sender) makes D free the pages and finish the request with an
   abort message saying the KV transfer failed and why; the other way round P reports it too.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.request import ReqStatus
from pdserve.shared.engine.request_validation import RequestError
from pdserve.shared.protocol import DecodeRequest, GenerateRequest, PrefillRequest
from tests.helpers.pd_pair import PDPair
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

NEW_TOKENS = 12
CHUNK = 16


def _args(model_dir: str, **overrides) -> EngineArgs:
    base = {"chunked_prefill_size": CHUNK, "max_total_tokens": 4096}
    return EngineArgs(model_path=model_dir, device="cpu", dtype="float32", **{**base, **overrides})


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.fixture(scope="module")
def mixed(model_dir) -> Engine:
    return Engine(_args(model_dir))


@pytest.fixture
def pair(model_dir, request) -> PDPair:
    """A fresh prefill and decode engine whose fake KV managers share one hub."""
    p_over, d_over = getattr(request, "param", ({}, {}))
    hub = FakeTransferHub()
    prefill = PrefillEngine(_args(model_dir, **p_over), lambda pool: FakeKVManager(pool, "prefill-0", hub))
    decode = DecodeEngine(_args(model_dir, **d_over), lambda pool: FakeKVManager(pool, "decode-0", hub))
    yield PDPair(prefill, decode)
    assert hub.open_links() == 0, "a transfer was left open"
    prefill.kv_manager.close()
    decode.kv_manager.close()


def _prompts() -> list[list[int]]:
    shared = _prompt(70, seed=100)
    return [
        _prompt(1, seed=1),
        _prompt(3, seed=2),
        _prompt(17, seed=3),
        _prompt(150, seed=4),  # ten chunks of 16
        shared + _prompt(9, seed=5),
        shared + _prompt(30, seed=6),  # shares 4 whole pages with the one before
        list(shared),
    ]


def _lps(entries) -> torch.Tensor:
    return torch.tensor([float("nan") if lp is None else lp for lp, _ in entries], dtype=torch.float64)


def _assert_same(got: dict, want: dict, label: str) -> None:
    assert got["output_ids"] == want["output_ids"], f"{label}: tokens differ"
    g, w = got["meta_info"], want["meta_info"]
    assert g["finish_reason"] == w["finish_reason"], label
    for key in ("output_token_logprobs", "input_token_logprobs"):
        assert [t for _, t in g[key]] == [t for _, t in w[key]], f"{label}: {key} tokens"
        assert torch.allclose(_lps(g[key]), _lps(w[key]), atol=1e-5, equal_nan=True), f"{label}: {key}"
    for key in ("output_top_logprobs", "input_top_logprobs"):
        for gi, wi in zip(g.get(key, []), w.get(key, []), strict=True):
            if wi is None:
                assert gi is None, f"{label}: {key}"
                continue
            assert [t for _, t in gi] == [t for _, t in wi], f"{label}: {key} ids"
            assert torch.allclose(_lps(gi), _lps(wi), atol=1e-5), f"{label}: {key} values"


def test_greedy_output_and_logprobs_equal_the_mixed_engine(mixed, pair):
    prompts = _prompts()
    params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS}
    logprobs = {"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0}
    want = mixed.generate(prompts, params, **logprobs)
    got = pair.generate(prompts, params, **logprobs)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_same(g, w, f"prompt {i} ({len(prompts[i])} tokens)")
        assert len(g["meta_info"]["input_token_logprobs"]) == len(prompts[i])
    assert all(done.ok for done in pair.done.values()) and len(pair.done) == len(prompts)
    pair.assert_idle()
    # a second round, no prompt logprobs: P's radix cache serves every whole page of each prompt but
    # the last token, D reports P's hits, and the tokens do not change
    again = pair.generate(prompts, params)
    assert [r["output_ids"] for r in again] == [r["output_ids"] for r in want]
    assert [r["meta_info"]["cached_tokens"] for r in again] == [(len(p) - 1) // 16 * 16 for p in prompts]
    pair.assert_idle()


def test_first_token_stops_and_prompt_scoring(mixed, pair):
    prompt = _prompt(20, seed=7)
    free = mixed.generate([prompt], {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})[0]
    first = free["output_ids"][0]
    cases = [
        {"temperature": 0, "max_new_tokens": 1},
        {"temperature": 0, "max_new_tokens": 8, "stop_token_ids": [first]},
        {"temperature": 0, "max_new_tokens": 0},
    ]
    for params in cases:
        want = mixed.generate([prompt], params, return_logprob=True, logprob_start_len=0)[0]
        got = pair.generate([prompt], params, return_logprob=True, logprob_start_len=0)[0]
        _assert_same(got, want, str(params))
    assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    pair.assert_idle()


def test_seeded_sampling_continues_on_the_decode_side(mixed, pair):
    prompt = _prompt(40, seed=8)
    params = {"temperature": 1.0, "top_p": 0.9, "sampling_seed": 77, "max_new_tokens": 10, "ignore_eos": True}
    assert (
        pair.generate([prompt], params)[0]["output_ids"] == mixed.generate([prompt], params)[0]["output_ids"]
    )
    pair.assert_idle()


# ---------------------------------------------------------------------------------------- aborts


def _submit(pair: PDPair, rid: str, n: int, seed: int, max_new: int = 50) -> None:
    params = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
    pair.submit(rid, _prompt(n, seed), sampling_params=params)


def _aborted(pair: PDPair, rid: str, message: str) -> None:
    out = pair.finished(rid)
    assert out is not None and out.finish_reason == {"type": "abort", "message": message}
    done = pair.done.get(rid)
    if done is not None:  # P held the request when the abort came, or it had already succeeded
        assert done.ok or done.reason == message


@pytest.mark.parametrize("pair", [({"max_running_requests": 1}, {})], indirect=True)
def test_abort_queued_at_prefill(pair):
    _submit(pair, "first", 120, seed=10)
    _submit(pair, "queued", 30, seed=11)
    pair.step()
    assert pair.prefill.scheduler.waiting[0].rid == "queued"
    pair.abort("queued", "client left")
    assert pair.done["queued"].ok is False and pair.done["queued"].reason == "client left"
    _aborted(pair, "queued", "client left")
    pair.run()
    assert pair.finished("first").finish_reason == {"type": "length", "length": 50}
    pair.assert_idle()


def test_abort_mid_prefill_after_pages_went_out(pair):
    _submit(pair, "long", 200, seed=12)
    for _ in range(3):
        pair.step()
    (req,) = pair.prefill.scheduler.prefilling
    assert req.status == ReqStatus.PREFILLING and 0 < req.num_computed < 200
    assert pair.prefill.sends._by_rid["long"].pages_sent > 0  # some pages are already on their way
    pair.abort("long", "client left")
    _aborted(pair, "long", "client left")
    pair.run()
    pair.assert_idle()


def test_abort_mid_transfer_while_decode_has_not_named_its_pages(pair):
    _submit(pair, "t", 40, seed=13)
    for _ in range(4):
        pair.step(decode=False)  # D never pre-allocates: P's sender stays Bootstrapping
    (req,) = pair.prefill.role.transferring
    assert req.status == ReqStatus.TRANSFERRING and req.output_ids
    pair.abort("t", "client left")
    _aborted(pair, "t", "client left")
    pair.run()
    pair.assert_idle()


def test_abort_waiting_for_kv_at_decode(pair):
    _submit(pair, "w", 60, seed=14)
    pair.step(prefill=False)  # D pre-allocates and names its pages; P has not started
    (req,) = pair.decode.role.waiting_for_kv
    assert req.status == ReqStatus.WAITING_FOR_KV and len(req.pages) == 4
    pair.abort("w", "client left")
    _aborted(pair, "w", "client left")
    pair.run()
    pair.assert_idle()


def test_abort_while_decoding(pair):
    _submit(pair, "d", 33, seed=15)
    _submit(pair, "other", 20, seed=16, max_new=6)
    for _ in range(8):
        pair.step()
    assert any(r.rid == "d" for r in pair.decode.scheduler.running)
    assert pair.done["d"].ok  # P is done with it: only D holds it now
    pair.abort("d", "client left")
    _aborted(pair, "d", "client left")
    pair.run()
    assert pair.finished("other").finish_reason == {"type": "length", "length": 6}
    pair.assert_idle()


# ---------------------------------------------------------------------------------------- failures


def test_prefill_side_failure_makes_decode_free_and_say_why(pair):
    _submit(pair, "f", 100, seed=17)
    for _ in range(2):
        pair.step()
    assert pair.decode.role.waiting_for_kv  # D is waiting, pages allocated
    # P gives up on its own (what a crash or a timeout looks like from D): only P is told to abort
    pair.prefill.abort("f", "prefill worker draining")
    pair.collect([], pair.prefill.take_done())
    pair.run()
    out = pair.finished("f")
    assert out.finish_reason["type"] == "abort"
    assert out.finish_reason["message"].startswith("KV transfer failed: ")
    assert "prefill worker draining" in out.finish_reason["message"]
    assert out.token_ids == [] and out.completion_tokens == 0
    assert pair.decode.stats.num_aborted == 1
    pair.assert_idle()


def test_decode_side_abort_fails_the_prefill_transfer(pair):
    _submit(pair, "g", 100, seed=18)
    pair.step()
    pair.collect(pair.decode.abort("g", "decode worker draining"))
    pair.run()
    done = pair.done["g"]
    assert done.ok is False and done.reason.startswith("KV transfer failed: ")
    assert "decode worker draining" in done.reason
    pair.assert_idle()
    assert pair.prefill.kv.num_cached_pages > 0  # P keeps what it computed in its radix cache


# ---------------------------------------------------------------------------------------- local prefill, refusals


def test_decode_prefills_locally_beside_remote_requests(mixed, pair):
    params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS}
    local, remote = _prompt(45, seed=20), _prompt(38, seed=21)
    want = mixed.generate([local, remote], params)
    pair.decode.add_request(GenerateRequest(rid="local", input_ids=local, sampling_params=dict(params)))
    pair.submit("remote", remote, sampling_params=dict(params))
    pair.run()
    assert [o for out in pair.outputs["local"] for o in out.token_ids] == want[0]["output_ids"]
    assert [o for out in pair.outputs["remote"] for o in out.token_ids] == want[1]["output_ids"]
    assert "local" not in pair.done and pair.done["remote"].ok
    pair.assert_idle()


def test_refusals_name_the_reason(pair):
    prompt = _prompt(10, seed=22)
    with pytest.raises(RequestError, match="takes PrefillRequests"):
        pair.prefill.add_request(GenerateRequest(rid="x", input_ids=prompt))
    with pytest.raises(RequestError, match="n > 1"):
        pair.submit("n2", prompt, sampling_params={"n": 2})
    with pytest.raises(RequestError, match="cannot start"):
        pair.prefill.add_prefill(PrefillRequest(GenerateRequest(rid="y", input_ids=prompt), "fake://nobody"))
    with pytest.raises(RequestError, match="prefill_kv_endpoint"):
        pair.decode.add_remote(DecodeRequest(GenerateRequest(rid="z", input_ids=prompt), ""))
    pair.assert_idle()


# a prefill pool of 6 pages of 16 tokens: two 80-token prompts (5 pages each) fill it chunk by chunk
# with neither able to finish
_SMALL_PREFILL_POOL = ({"max_total_tokens": 96, "page_size": 16}, {})


@pytest.mark.parametrize("pair", [_SMALL_PREFILL_POOL], indirect=True)
def test_prefills_that_fill_the_pool_before_any_page_went_out_restart_one_quietly(pair):
    _submit(pair, "a", 80, seed=20, max_new=4)
    _submit(pair, "b", 80, seed=21, max_new=4)
    for _ in range(8):
        pair.step(decode=False)  # D names no pages: both senders wait, nothing is sent
    assert pair.prefill.scheduler.num_retractions >= 1  # one gave its pages back instead of waiting
    pair.run()
    assert all(pair.finished(rid).finish_reason["type"] == "length" for rid in "ab")
    assert all(pair.done[rid].ok for rid in "ab")
    pair.assert_idle()


@pytest.mark.parametrize("pair", [_SMALL_PREFILL_POOL], indirect=True)
def test_prefills_that_fill_the_pool_after_sending_pages_fail_the_newest_and_free_its_pages(pair):
    from pdserve.prefill.prefill_engine import STUCK_MESSAGE

    _submit(pair, "a", 80, seed=22, max_new=4)
    _submit(pair, "b", 80, seed=23, max_new=4)
    pair.run()  # both senders get their pages named at once, and send as chunks complete
    done = pair.done
    assert done["a"].ok and not done["b"].ok and done["b"].reason == STUCK_MESSAGE
    assert pair.finished("a").finish_reason["type"] == "length"
    assert pair.finished("b").finish_reason["type"] == "abort"  # D freed b's pages: the router retries
    pair.assert_idle()


def test_batch_lines_carry_each_roles_fields_as_sglang_prints_them(pair, caplog):
    pair.decode.batch_log.decode_log_interval = 1
    with caplog.at_level(logging.INFO, logger="pdserve.shared.engine.batch_log"):
        _submit(pair, "logged", 20, seed=30, max_new=3)
        pair.step(decode=False)  # D has named no pages: P's sender waits, its prompt is computed
        pair.run()
    lines = [r.getMessage() for r in caplog.records]
    prefill = [ln for ln in lines if ln.startswith("Prefill batch.")]
    assert prefill[0].endswith("#running-req: 0, #queue-req: 0, #prealloc-req: 1, #inflight-req: 0, ")
    decode = [ln for ln in lines if ln.startswith("Decode batch.")]
    assert decode and all(
        "pre-allocated usage: 0.00, #prealloc-req: 0, #transfer-req: 0, #retracted-req: 0, cpu graph: False, "
        in ln
        for ln in decode
    )
    pair.assert_idle()
