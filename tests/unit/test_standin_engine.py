"""The stand-in engine (a benchmark tool) speaks the worker protocol: checked over a real ZMQ socket.

The engine runs in a thread of this process on a loopback port; a DealerSocket plays the router.
Checked: its frames are byte-identical to the protocol's encoding; one OutputBatch per step holds
every running sample, with tokens cycling through the configured ids and a length finish; steps are
`step_ms` apart; aborts, load, server info, flush and weight updates are answered as a worker would.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from pdserve.bench.standin_engine import StandinConfig, StandinEngine
from pdserve.bench.standin_process import bind_router_socket, parse_token_ids
from pdserve.bench.standin_wire import batch_frame, output_wire
from pdserve.shared.protocol import (
    AbortRequest,
    FlushCacheRequest,
    FlushCacheResult,
    GenerateRequest,
    LoadQuery,
    LoadReport,
    OutputBatch,
    RequestOutput,
    ServerInfo,
    ServerInfoQuery,
    UpdateWeightsRequest,
    UpdateWeightsResult,
    encode,
)
from pdserve.shared.worker.zmq_io import DealerSocket

STEP_MS = 10.0


def test_frames_match_the_protocol_encoding():
    reason = {"type": "length", "length": 3}
    frame = batch_frame([output_wire("r", 1, [7], 5, 3, reason), output_wire("s", 0, [8], 2, 1, None)])
    expected = OutputBatch(
        outputs=[
            RequestOutput(rid="r", token_ids=[7], index=1, finished=True, finish_reason=reason,
                          prompt_tokens=5, completion_tokens=3),
            RequestOutput(rid="s", token_ids=[8], prompt_tokens=2, completion_tokens=1),
        ]
    )  # fmt: skip
    assert frame == encode(expected)


def test_parse_token_ids():
    assert parse_token_ids("3:6") == (3, 4, 5)
    assert parse_token_ids("9,1") == (9, 1)


@pytest.fixture
def standin():
    """(engine, dealer) with the engine bound but not yet running; `start()` runs it in a thread."""
    ctx = zmq.Context()
    sock = bind_router_socket(ctx, "tcp://127.0.0.1:0")
    cfg = StandinConfig(step_ms=STEP_MS, token_ids=(97, 98), tokenizer_path="/tok", page_size=4)
    engine = StandinEngine(sock, cfg, worker_id="w0")
    dealer = DealerSocket(ctx, sock.getsockopt_string(zmq.LAST_ENDPOINT))
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve, args=(stop,), daemon=True)
    engine.start = thread.start
    yield engine, dealer
    stop.set()
    if thread.is_alive():
        thread.join(5)
    dealer.close()
    sock.close(linger=0)
    ctx.term()


def _frames_until_finished(dealer: DealerSocket, samples: int) -> list[tuple[float, OutputBatch]]:
    frames, left = [], samples
    while left:
        msg = dealer.recv(timeout_ms=2000)
        assert isinstance(msg, OutputBatch)
        frames.append((time.monotonic(), msg))
        left -= sum(o.finished for o in msg.outputs)
    return frames


def test_one_batch_per_step_with_every_sample(standin):
    engine, dealer = standin
    dealer.send(GenerateRequest(rid="a", input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 3}))
    dealer.send(GenerateRequest(rid="b", input_ids=[4], sampling_params={"max_new_tokens": 2, "n": 2}))
    time.sleep(0.2)  # both queued before the loop starts: they join the same first step
    engine.start()
    frames = _frames_until_finished(dealer, samples=3)
    assert [sorted((o.rid, o.index) for o in f.outputs) for _, f in frames] == [
        [("a", 0), ("b", 0), ("b", 1)],
        [("a", 0), ("b", 0), ("b", 1)],
        [("a", 0)],
    ]
    a = [o for _, f in frames for o in f.outputs if o.rid == "a"]
    assert [o.token_ids for o in a] == [[97], [98], [97]]
    assert [o.completion_tokens for o in a] == [1, 2, 3] and all(o.prompt_tokens == 3 for o in a)
    assert [o.finished for o in a] == [False, False, True]
    assert a[-1].finish_reason == {"type": "length", "length": 3}
    b_last = [o for o in frames[1][1].outputs if o.rid == "b"]
    assert all(o.finish_reason == {"type": "length", "length": 2} and o.prompt_tokens == 1 for o in b_last)
    # one step every step_ms, no bursts (loose: client-side arrival times jitter on a busy machine)
    assert frames[-1][0] - frames[0][0] >= 1.5 * STEP_MS / 1000
    deadline = time.monotonic() + 2.0  # the engine counts a step after sending its frame
    while engine.steps < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.steps == 3 and engine.tokens_sent == 7


def test_a_duplicate_or_empty_rid_is_refused_and_the_engine_serves_on(standin):
    engine, dealer = standin
    engine.start()
    dealer.send(GenerateRequest(rid="d", input_ids=[1], sampling_params={"max_new_tokens": 50}))
    dealer.send(GenerateRequest(rid="d", input_ids=[1], sampling_params={"max_new_tokens": 1}))
    dealer.send(GenerateRequest(rid="", input_ids=[1], sampling_params={"max_new_tokens": 1}))
    refused = []
    while len(refused) < 2:
        msg = dealer.recv(timeout_ms=2000)
        assert isinstance(msg, OutputBatch)
        refused += [o for o in msg.outputs if o.error]
    assert [(o.rid, o.finished, o.error) for o in refused] == [
        ("d", True, "Duplicate or empty request id 'd'."),
        ("", True, "Duplicate or empty request id ''."),
    ]
    dealer.send(GenerateRequest(rid="e", input_ids=[1], sampling_params={"max_new_tokens": 1}))
    while True:  # still serving: the next request runs to its end
        msg = dealer.recv(timeout_ms=2000)
        assert isinstance(msg, OutputBatch)
        if any(o.rid == "e" and o.finished for o in msg.outputs):
            break


def test_abort_load_info_flush_and_weights(standin):
    engine, dealer = standin
    engine.start()
    dealer.send(GenerateRequest(rid="long", input_ids=[1] * 6, sampling_params={"max_new_tokens": 10_000}))
    first = dealer.recv(timeout_ms=2000)
    assert isinstance(first, OutputBatch) and first.outputs[0].token_ids == [97]

    dealer.send(LoadQuery(query_id=5))
    dealer.send(FlushCacheRequest(query_id=6))
    dealer.send(ServerInfoQuery(query_id=7))
    dealer.send(UpdateWeightsRequest(query_id=8, model_path="/x"))
    replies = {}
    while len(replies) < 4:
        msg = dealer.recv(timeout_ms=2000)
        assert msg is not None
        if not isinstance(msg, OutputBatch):
            replies[type(msg)] = msg
    load = replies[LoadReport]
    assert (load.query_id, load.num_running, load.page_size) == (5, 1, 4)
    assert load.num_used_tokens == load.num_total_pages * 4 - load.num_free_pages * 4 > 6
    assert replies[FlushCacheResult] == FlushCacheResult(
        6, False, "Cache not flushed: there are running or queued requests."
    )
    info = replies[ServerInfo]
    assert (info.query_id, info.worker_id, info.tokenizer_path, info.role) == (7, "w0", "/tok", "mixed")
    assert (
        isinstance(replies[UpdateWeightsResult], UpdateWeightsResult)
        and not replies[UpdateWeightsResult].success
    )

    dealer.send(AbortRequest(rid="long", message="stop it"))
    while True:
        msg = dealer.recv(timeout_ms=2000)
        assert isinstance(msg, OutputBatch)
        if msg.outputs[-1].finished:
            break
    last = msg.outputs[-1]
    assert last.finish_reason == {"type": "abort", "message": "stop it"} and last.token_ids == []
    dealer.send(FlushCacheRequest(query_id=9))
    assert dealer.recv(timeout_ms=2000) == FlushCacheResult(9, True, "Cache flushed.")
    assert not engine.running


def test_first_token_now_answers_on_arrival(standin):
    engine, dealer = standin
    engine.cfg.step_ms = 1000.0  # a later token would take a second: the first must not wait for it
    engine.start()
    dealer.send(GenerateRequest(rid="busy", input_ids=[1], sampling_params={"max_new_tokens": 50}))
    dealer.recv(timeout_ms=2000)  # idle engine: stepped at once; busy from now on
    engine.cfg.first_token_now = True
    sent = time.monotonic()
    dealer.send(GenerateRequest(rid="q", input_ids=[1, 2], sampling_params={"max_new_tokens": 1}))
    msg = dealer.recv(timeout_ms=2000)
    assert time.monotonic() - sent < 0.5
    assert isinstance(msg, OutputBatch) and [(o.rid, o.token_ids, o.finished) for o in msg.outputs] == [
        ("q", [97], True)
    ]
    assert list(engine.running) == [("busy", 0)]


def test_first_token_now_on_an_idle_engine_steps_a_step_later(standin):
    engine, dealer = standin
    engine.cfg.step_ms = 200.0
    engine.cfg.first_token_now = True
    engine.start()
    dealer.send(GenerateRequest(rid="q", input_ids=[1, 2], sampling_params={"max_new_tokens": 2}))
    frames = _frames_until_finished(dealer, samples=1)
    assert [[o.token_ids for o in f.outputs] for _, f in frames] == [[[97]], [[98]]]
    # the second token follows the step clock, not the first token's frame at once (lower bound only:
    # a busy machine can only make it later)
    assert frames[1][0] - frames[0][0] >= 0.5 * engine.cfg.step_ms / 1000
