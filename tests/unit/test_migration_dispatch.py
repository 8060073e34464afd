"""Migration without processes: a worker that fails after tokens reached the client hands the request
(prompt + tokens so far) to another worker, and the stream goes on.

Checked: the move goes to a worker not yet tried, under `<rid>~retry1`, as a plain GenerateRequest
(local prefill, also when the failed worker was a decode worker with a prefill partner) carrying
the yielded tokens in `generated_ids`; the consumer sees the new worker's outputs under its own
rid without prompt logprobs again; a move counts as an attempt (max_attempts ends the request);
n > 1 and `migrate=False` end the stream with an abort as before.
"""

from __future__ import annotations

import asyncio

from pdserve.router.cluster.worker_conn import StreamFailure
from pdserve.shared.protocol import DecodeRequest, GenerateRequest
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


def test_without_migration_or_with_several_samples_the_stream_ends_with_an_abort():
    _ends_with_abort(*make_dispatcher(("a", "mixed"), ("b", "mixed"), migrate=False), num_samples=1)
    _ends_with_abort(*make_dispatcher(("a", "mixed"), ("b", "mixed")), num_samples=2)
