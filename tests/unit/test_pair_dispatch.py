"""Dispatch of a pair without processes: stand-in connections record what the router sends and let the
test deliver what the workers would answer, in any order.

Checked: which worker is cancelled when the other side fails before the first token, where the
retry goes (another prefill worker, or local prefill at the decode worker, under `<rid>~retry1`),
that the prefill side's end after the first token changes nothing, and that a consumer that stops
aborts the rid on both workers.
"""

from __future__ import annotations

import asyncio
import contextlib

from pdserve.router.cluster.worker_conn import StreamFailure
from pdserve.shared.protocol import (
    AbortRequest,
    DecodeRequest,
    GenerateRequest,
    PrefillDone,
    PrefillRequest,
    RequestOutput,
)
from tests.helpers.fake_dispatch import make_dispatcher, next_item, settle, worker_output

REQ = GenerateRequest(rid="r", input_ids=list(range(10)), sampling_params={"max_new_tokens": 2})


def test_a_failed_prefill_cancels_decode_and_the_retry_prefills_locally():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("p", "prefill"), ("d", "decode"))
        outputs = dispatcher.run(REQ)
        first = asyncio.ensure_future(next_item(outputs))
        await settle()
        assert [type(m) for m in conns["d"].sent] == [DecodeRequest]
        assert [type(m) for m in conns["p"].sent] == [PrefillRequest]
        conns["p"].deliver(PrefillDone(rid="r", ok=False, reason="KV transfer failed: peer gone"))
        await settle()
        assert conns["d"].sent[1] == AbortRequest(rid="r", message="Moved to another worker.")
        retry = conns["d"].sent[2]
        assert type(retry) is GenerateRequest and retry.rid == "r~retry1"  # local prefill: no P left
        assert len(conns["p"].sent) == 1  # P answered: nothing more to tell it
        conns["d"].deliver(worker_output("r~retry1", [5, 6], True, {"type": "length", "length": 2}))
        out = await first
        assert out.rid == "r" and out.token_ids == [5, 6] and out.finished
        await outputs.aclose()

    asyncio.run(main())


def test_a_transfer_failure_at_decode_cancels_prefill_and_retries_on_another_prefill_worker():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("p1", "prefill"), ("p2", "prefill"), ("d", "decode"))
        outputs = dispatcher.run(REQ)
        first = asyncio.ensure_future(next_item(outputs))
        await settle()
        used, other = ("p1", "p2") if conns["p1"].sent else ("p2", "p1")
        failed = {"type": "abort", "message": "KV transfer failed: no heartbeat from the prefill worker"}
        conns["d"].deliver(worker_output("r", [], True, failed))
        await settle()
        assert conns[used].sent[-1] == AbortRequest(rid="r", message="Moved to another worker.")
        (retry,) = conns[other].sent
        assert type(retry) is PrefillRequest and retry.request.rid == "r~retry1"
        assert type(conns["d"].sent[-1]) is DecodeRequest and conns["d"].sent[-1].request.rid == "r~retry1"
        conns["d"].deliver(worker_output("r~retry1", [7], True, {"type": "length", "length": 1}))
        assert (await first).token_ids == [7]
        await outputs.aclose()

    asyncio.run(main())


def test_after_the_first_token_the_prefill_side_no_longer_matters_and_leaving_aborts_both():
    async def main() -> None:
        dispatcher, conns = make_dispatcher(("p", "prefill"), ("d", "decode"))
        outputs = dispatcher.run(REQ)
        assert (
            await _next_after(outputs, lambda: conns["d"].deliver(worker_output("r", [1])))
        ).token_ids == [1]
        conns["p"].deliver(StreamFailure("lost the connection to worker p"), rid="r")
        assert (
            await _next_after(outputs, lambda: conns["d"].deliver(worker_output("r", [2])))
        ).token_ids == [2]
        await outputs.aclose()  # the client left with the request unfinished
        assert conns["d"].sent[-1].rid == "r" and type(conns["d"].sent[-1]) is AbortRequest
        assert not any(type(m) is AbortRequest for m in conns["p"].sent)  # P had ended: nothing to abort
        second = dispatcher.run(GenerateRequest(rid="s", input_ids=list(range(10))))
        task = asyncio.ensure_future(next_item(second))
        await settle()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await second.aclose()
        for worker in ("p", "d"):
            assert conns[worker].sent[-1] == AbortRequest(
                rid="s", message="The router stopped the request (its client left, or stop strings ended it)."
            )

    asyncio.run(main())


async def _next_after(outputs, deliver) -> RequestOutput:
    task = asyncio.ensure_future(next_item(outputs))
    await settle()
    deliver()
    return await task
