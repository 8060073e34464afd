"""A prefill engine and a decode engine in one process, driven the way the router drives the workers.

`PDPair.submit` sends a PrefillRequest to P and a DecodeRequest to D with the same rid (in either
order); `step()` steps both engines once (P first) and collects D's RequestOutputs and P's
PrefillDone messages; `generate()` runs prompts to completion and returns the same dicts as
`Engine.generate`. `assert_idle()` checks that neither side holds a page or a request.
"""

from __future__ import annotations

import time
from typing import Any

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.output import merge_sample_outputs
from pdserve.shared.protocol import DecodeRequest, GenerateRequest, PrefillDone, PrefillRequest, RequestOutput


class PDPair:
    def __init__(self, prefill: PrefillEngine, decode: DecodeEngine):
        self.prefill = prefill
        self.decode = decode
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done: dict[str, PrefillDone] = {}

    def submit(self, rid: str, input_ids: list[int], decode_first: bool = False, **fields: Any) -> None:
        gen = GenerateRequest(rid=rid, input_ids=list(input_ids), **fields)
        p_msg = PrefillRequest(gen, self.decode.kv_manager.endpoint, "decode-0")
        d_msg = DecodeRequest(gen, self.prefill.kv_manager.endpoint, "prefill-0")
        if decode_first:
            self.decode.add_remote(d_msg)
            self.prefill.add_prefill(p_msg)
        else:
            self.prefill.add_prefill(p_msg)
            self.decode.add_remote(d_msg)

    def collect(self, outs: list, dones: list[PrefillDone] = ()) -> None:
        for out in outs:
            self.outputs.setdefault(out.rid, []).append(out)
        for done in dones:
            assert done.rid not in self.done, f"two PrefillDone for {done.rid}"
            self.done[done.rid] = done

    def step(self, prefill: bool = True, decode: bool = True) -> None:
        if prefill:
            self.prefill.step()
            self.collect([], self.prefill.take_done())
        if decode:
            self.collect(self.decode.step())

    def abort(self, rid: str, message: str = "Aborted by the client.") -> None:
        """What the router does on a client disconnect: abort on both workers."""
        self.prefill.abort(rid, message)
        self.collect([], self.prefill.take_done())
        self.collect(self.decode.abort(rid, message))

    def has_work(self) -> bool:
        return self.prefill.has_work() or self.decode.has_work()

    def run(self, timeout_s: float = 120.0) -> None:
        """Steps both engines until idle. Bounded by time, not steps: a real backend (zmq) moves pages
        on its own thread, so some steps only wait."""
        deadline = time.monotonic() + timeout_s
        while self.has_work():
            if time.monotonic() > deadline:
                raise AssertionError(f"the pair made no progress in {timeout_s} s")
            self.step()
            if not (self.prefill.has_compute() or self.decode.has_compute()):
                time.sleep(0.0005)  # only transfers in flight: let the backend's thread run

    def finished(self, rid: str) -> RequestOutput | None:
        outs = self.outputs.get(rid, [])
        return outs[-1] if outs and outs[-1].finished else None

    def generate(
        self, prompts: list[list[int]], params: dict[str, Any], **fields: Any
    ) -> list[dict[str, Any]]:
        rids = [f"pd-{len(self.outputs) + len(self.done)}-{i}" for i in range(len(prompts))]
        for i, (rid, prompt) in enumerate(zip(rids, prompts)):
            self.submit(rid, prompt, decode_first=i % 2 == 1, sampling_params=dict(params), **fields)
        self.run()
        return [merge_sample_outputs(self.outputs[rid]) for rid in rids]

    def assert_idle(self) -> None:
        for engine in (self.prefill, self.decode):
            assert_idle(engine)


def assert_idle(engine: Engine) -> None:
    """No live request, every page free or evictable in the cache, the page bookkeeping consistent."""
    load = engine.load()
    name = type(engine).__name__
    assert not engine.has_work(), f"{name} still has work"
    assert load.num_running == 0 and load.num_waiting == 0, f"{name}: {load}"
    assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages, (
        f"{name} leaks pages: {load}"
    )
    assert engine._live == {}, f"{name} has orphaned rids {list(engine._live)}"
    engine.kv.check_invariants()
