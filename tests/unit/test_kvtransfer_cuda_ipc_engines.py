"""A prefill and a decode engine in one process over two KV pools, the cuda_ipc backend between them
(CPU pools: the prefill side writes into the decode pool through the same-host plane and the write
gate; tiny random Llama, float32).

- greedy output equals the mixed engine's token for token;
- aborts at P or D at any moment, a prefill manager that dies mid-transfer and a decode manager
  that dies mid-transfer leave every page of the surviving engine free and no request behind.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer import KVTransferConfig, make_kv_manager
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.pd_pair import PDPair, assert_idle
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

CHUNK = 16
CONFIG = KVTransferConfig(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0, transfer_timeout_s=10.0)


def _args(model_dir: str) -> EngineArgs:
    return EngineArgs(
        model_path=model_dir, device="cpu", dtype="float32", chunked_prefill_size=CHUNK, max_total_tokens=2048
    )


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.fixture
def pair(model_dir) -> PDPair:
    prefill = PrefillEngine(
        _args(model_dir), lambda pool: make_kv_manager("cuda_ipc", pool, "prefill-0", config=CONFIG)
    )
    decode = DecodeEngine(
        _args(model_dir), lambda pool: make_kv_manager("cuda_ipc", pool, "decode-0", config=CONFIG)
    )
    yield PDPair(prefill, decode)
    prefill.kv_manager.close()
    decode.kv_manager.close()


def test_greedy_output_equals_the_mixed_engine(model_dir, pair):
    shared = _prompt(40, seed=100)
    prompts = [
        _prompt(1, 1),
        _prompt(17, 2),
        _prompt(150, 3),
        shared + _prompt(9, 4),
        shared + _prompt(30, 5),
    ]
    params = {"temperature": 0.0, "max_new_tokens": 10}
    want = Engine(_args(model_dir)).generate(prompts, params)
    got = pair.generate(prompts, params)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert all(done.ok for done in pair.done.values())
    pair.assert_idle()
    assert pair.decode.kv_manager.stats()["gate_slots"] == 0


@pytest.mark.parametrize("steps", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("side", ["both", "prefill", "decode"])
def test_aborts_at_any_moment_leave_every_page_free(pair, steps, side):
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    pair.submit("x", _prompt(120, seed=10), sampling_params=dict(params))
    pair.submit("y", _prompt(50, seed=11), sampling_params=dict(params))
    for _ in range(steps):
        pair.step()
    if side == "both":
        pair.abort("x", "client left")
    elif side == "prefill":
        pair.prefill.abort("x", "prefill worker draining")
        pair.collect([], pair.prefill.take_done())
    else:
        pair.collect(pair.decode.abort("x", "decode worker draining"))
    pair.run()
    assert pair.finished("x").finish_reason["type"] == "abort"
    assert pair.finished("y").finish_reason == {"type": "length", "length": 30}
    pair.assert_idle()
    assert pair.decode.kv_manager.stats()["gate_slots"] == 0


@pytest.mark.parametrize("dies", ["prefill", "decode"])
def test_a_peer_dying_mid_transfer_leaves_the_survivor_idle(pair, dies):
    params = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    pair.submit("x", _prompt(200, seed=12), sampling_params=dict(params))
    for _ in range(3):
        pair.step()
    assert pair.decode.role.waiting_for_kv  # D holds pages, P is mid-prefill
    dead, survivor = (pair.prefill, pair.decode) if dies == "prefill" else (pair.decode, pair.prefill)
    dead.kv_manager.close()  # what the survivor sees of a dead peer: its sockets close
    for _ in range(20000):
        if dies == "prefill":
            pair.step(prefill=False)
        else:
            pair.step(decode=False)
        if not survivor.has_work():
            break
    assert_idle(survivor)
    if dies == "prefill":
        assert pair.finished("x").finish_reason["message"].startswith("KV transfer failed: ")
    else:
        assert not pair.done["x"].ok and pair.done["x"].reason.startswith("KV transfer failed: ")
