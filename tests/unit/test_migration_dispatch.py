"""Migration without processes: a worker that fails after tokens reached the client hands the request
(prompt + tokens so far) to another worker, and the stream goes on.

Checked: the move goes to a worker not yet tried, under `<rid>~retry1`, as a plain GenerateRequest
(local prefill, also when the failed worker was a decode worker with a prefill partner) carrying
the yielded tokens in `generated_ids`; the consumer sees the new worker's outputs under its own
rid without prompt logprobs again; a move counts as an attempt (max_attempts ends the request);
with n > 1 each unfinished sample moves as its own one-sample request (`<rid>~s<index>`, its tokens,
its derived seed) and its outputs come back under the request's rid and the sample's index;
`migrate=False` ends the stream with an abort as before.
"""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.cluster.worker_conn import StreamFailure
from pdserve.shared.protocol import AbortRequest, DecodeRequest, GenerateRequest, RequestOutput
from tests.helpers.fake_dispatch import make_dispatcher, next_item, settle, worker_output

REQ = GenerateRequest(rid="r", input_ids=list(range(10)), sampling_params={"max_new_tokens": 6})
LENGTH = {"type": "length", "length": 6}


async def _take(outputs, deliver) -> object:
    task = asyncio.ensure_future(next_item(outputs))
    await settle()
    deliver()
    return await task


def rid_of(msg) -> str:
    """The rid a message to a worker names (a P/D message's is its request's)."""
    return getattr(msg, "request", msg).rid


def _first_worker(conns) -> str:
    return next(w for w, c in conns.items() if c.sent)


def test_a_stream_moves_to_another_worker_with_its_tokens():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("a", "mixed"), ("b", "mixed"))
        outputs = dispatcher.run(REQ)
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        first = _first_worker(conns)
        other = "b" if first == "a" else "a"
        conns[first].deliver(worker_output("r", [11, 12]))
        assert (await task).token_ids == [11, 12]
        conns[first].deliver(StreamFailure("lost the connection"), rid="r")
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        (moved,) = conns[other].sent
        assert type(moved) is GenerateRequest and moved.rid == "r~retry1"
        assert moved.generated_ids == [11, 12] and moved.input_ids == REQ.input_ids
        assert moved.sampling_params == REQ.sampling_params  # the worker counts the tokens itself
        conns[other].deliver(worker_output("r~retry1", [13]))
        out = await task
        assert out.rid == "r" and out.token_ids == [13]
        ends = await _take(
            outputs, lambda: conns[other].deliver(worker_output("r~retry1", [14, 15, 16], True, LENGTH))
        )
        assert ends.rid == "r" and ends.token_ids == [14, 15, 16] and ends.finished
        await outputs.aclose()

    asyncio.run(main())


def test_a_decode_worker_that_dies_mid_stream_moves_without_a_prefill_partner():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("p", "prefill"), ("d1", "decode"), ("d2", "decode"))
        outputs = dispatcher.run(REQ)
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        first = "d1" if conns["d1"].sent else "d2"
        other = "d2" if first == "d1" else "d1"
        assert type(conns[first].sent[0]) is DecodeRequest
        out = worker_output("r", [21])
        out.input_token_logprobs = [[None, 0]]
        conns[first].deliver(out)
        assert (await task).token_ids == [21]
        conns[first].deliver(StreamFailure("lost the connection"), rid="r")
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        (moved,) = [m for m in conns[other].sent if rid_of(m) == "r~retry1"]
        assert type(moved) is GenerateRequest and moved.generated_ids == [21]  # prefills locally
        assert not [m for m in conns["p"].sent if rid_of(m) == "r~retry1"]
        again = worker_output("r~retry1", [22, 23, 24, 25, 26], True, LENGTH)
        again.input_token_logprobs = []
        conns[other].deliver(again)
        got = await task
        assert got.token_ids == [22, 23, 24, 25, 26] and got.input_token_logprobs is None
        await outputs.aclose()

    asyncio.run(main())


def test_moves_count_as_attempts():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("a", "mixed"), ("b", "mixed"), max_attempts=2)
        outputs = dispatcher.run(REQ)
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        first = _first_worker(conns)
        other = "b" if first == "a" else "a"
        conns[first].deliver(worker_output("r", [1]))
        await task
        conns[first].deliver(StreamFailure("gone"), rid="r")
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        conns[other].deliver(worker_output("r~retry1", [2]))
        assert (await task).token_ids == [2]
        last = await _take(outputs, lambda: conns[other].deliver(StreamFailure("gone too"), rid="r~retry1"))
        assert last.finished and last.finish_reason["type"] == "abort"
        assert last.finish_reason["status_code"] == 503
        await outputs.aclose()

    asyncio.run(main())


def _ends_with_abort(dispatcher, conns, num_samples: int) -> None:
    async def main() -> None:
        outputs = dispatcher.run(REQ, num_samples=num_samples)
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        first = _first_worker(conns)
        conns[first].deliver(worker_output("r", [1]))
        await task
        last = await _take(outputs, lambda: conns[first].deliver(StreamFailure("gone"), rid="r"))
        assert last.finished and last.finish_reason["type"] == "abort"
        assert "failed during the request" in last.finish_reason["message"]
        assert all(rid_of(m) == "r" for c in conns.values() for m in c.sent)  # nothing moved
        await outputs.aclose()

    asyncio.run(main())


def test_without_migration_the_stream_ends_with_an_abort():
    _ends_with_abort(*make_dispatcher(("a", "mixed"), ("b", "mixed"), migrate=False), num_samples=1)
    _ends_with_abort(*make_dispatcher(("a", "mixed"), ("b", "mixed"), migrate=False), num_samples=2)


def test_each_unfinished_sample_moves_on_its_own():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("a", "mixed"), ("b", "mixed"))
        req = GenerateRequest(
            rid="r",
            input_ids=list(range(10)),
            sampling_params={"max_new_tokens": 6, "n": 3, "sampling_seed": 7},
        )
        outputs = dispatcher.run(req, num_samples=3)
        task = asyncio.ensure_future(next_item(outputs))
        await settle()
        first = _first_worker(conns)
        other = "b" if first == "a" else "a"
        sample = lambda index, tokens, done=False: RequestOutput(
            rid="r", token_ids=tokens, index=index, finished=done, finish_reason=LENGTH if done else None
        )
        conns[first].deliver(sample(0, [1, 2]))
        assert (await task).token_ids == [1, 2]
        for out in (sample(1, [5]), sample(2, [8, 9, 10, 11, 12, 13], True)):
            assert (await _take(outputs, lambda out=out: conns[first].deliver(out))).index == out.index
        task = asyncio.ensure_future(next_item(outputs))
        conns[first].deliver(StreamFailure("gone"), rid="r")
        await settle()
        moved = {m.rid: m for m in conns[other].sent}
        assert set(moved) == {"r~s0", "r~s1"}  # sample 2 had finished
        assert moved["r~s0"].generated_ids == [1, 2] and moved["r~s1"].generated_ids == [5]
        assert moved["r~s1"].sampling_params == {"max_new_tokens": 6, "n": 1, "sampling_seed": 8}
        assert moved["r~s0"].sampling_params["sampling_seed"] == 7
        conns[other].deliver(worker_output("r~s1", [6, 7, 8, 9, 10], True, LENGTH))
        out = await task
        assert (out.rid, out.index, out.token_ids, out.finished) == ("r", 1, [6, 7, 8, 9, 10], True)
        assert dispatcher.abort("r")  # a client abort reaches the moved sample still running
        assert [m.rid for m in conns[other].sent if type(m) is AbortRequest] == ["r~s0"]
        conns[other].deliver(worker_output("r~s0", [], True, {"type": "abort", "message": "Aborted."}))
        last = await next_item(outputs)
        assert (last.index, last.finish_reason["type"]) == (0, "abort")
        with pytest.raises(StopAsyncIteration):
            await next_item(outputs)

    asyncio.run(main())
