"""`worker --role prefill` and `worker --role decode` processes with the zmq KV backend (tiny random
Llama, CPU, float32), driven through their ZMQ sockets the way the router drives them: a
PrefillRequest to P and a DecodeRequest to D at once, with the same rid; tokens stream from D, P
answers one PrefillDone per request.

1. Greedy output and logprobs (prompt logprobs too) equal an in-process mixed Engine's.
2. Aborts (mid-prefill at P, waiting for KV at D, decoding at D) leave both workers' load reports
   with every page free or cached and nothing running or waiting.
3. A DecodeRequest whose prefill never comes fails after --kv-transfer-timeout with a clear message,
   and D frees its pages.
4. A request kind a role does not serve is refused with the answer its sender waits for.
"""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import pytest
import torch
import zmq

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.output import merge_sample_outputs
from pdserve.shared.protocol import (
    AbortRequest,
    DecodeRequest,
    GenerateRequest,
    LoadQuery,
    LoadReport,
    OutputBatch,
    PrefillDone,
    PrefillRequest,
    RequestOutput,
)
from pdserve.shared.worker.zmq_io import DealerSocket
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

COMMON_FLAGS = ("--dtype", "float32", "--chunked-prefill-size", "16", "--max-total-tokens", "4096")


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


class RouterStub:
    """Two DEALER sockets, one per worker; buffers D's outputs and P's PrefillDone by rid."""

    def __init__(self, prefill, decode):
        self.ctx = zmq.Context()
        self.p = DealerSocket(self.ctx, prefill.zmq_address)
        self.d = DealerSocket(self.ctx, decode.zmq_address)
        self.p_kv, self.d_kv = prefill.kv_address, decode.kv_address
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.done: dict[str, PrefillDone] = {}
        self.loads: dict[int, LoadReport] = {}
        self._ids = itertools.count(1)

    def submit(self, rid: str, prompt: list[int], to_prefill: bool = True, **fields) -> None:
        gen = GenerateRequest(rid=rid, input_ids=prompt, **fields)
        self.d.send(DecodeRequest(gen, self.p_kv))
        if to_prefill:
            self.p.send(PrefillRequest(gen, self.d_kv))

    def abort(self, rid: str, message: str) -> None:
        self.p.send(AbortRequest(rid=rid, message=message))
        self.d.send(AbortRequest(rid=rid, message=message))

    def _pump(self, timeout_s: float) -> None:
        for sock in (self.p, self.d):
            msg = sock.recv(int(timeout_s * 1000 / 2))
            if isinstance(msg, OutputBatch):
                for out in msg.outputs:
                    self.outputs.setdefault(out.rid, []).append(out)
            elif isinstance(msg, PrefillDone):
                assert msg.rid not in self.done, f"two PrefillDone for {msg.rid}"
                self.done[msg.rid] = msg
            elif isinstance(msg, LoadReport):
                self.loads[msg.query_id] = msg

    def wait(self, condition, timeout_s: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s} s for {what}")
            self._pump(0.05)

    def finished(self, rid: str) -> RequestOutput | None:
        outs = self.outputs.get(rid, [])
        return outs[-1] if outs and outs[-1].finished else None

    def result(self, rid: str, timeout_s: float = 60.0) -> dict:
        self.wait(lambda: self.finished(rid) is not None and rid in self.done, timeout_s, rid)
        return merge_sample_outputs(self.outputs[rid])

    def load(self, sock: DealerSocket) -> LoadReport:
        query_id = next(self._ids)
        sock.send(LoadQuery(query_id=query_id))
        self.wait(lambda: query_id in self.loads, 10.0, "a load report")
        return self.loads.pop(query_id)

    def assert_idle(self) -> None:
        for name, sock in (("prefill", self.p), ("decode", self.d)):
            load = self.load(sock)
            assert load.num_running == 0 and load.num_waiting == 0, f"{name}: {load}"
            assert load.num_free_pages + load.num_evictable_pages == load.num_total_pages, f"{name}: {load}"

    def close(self) -> None:
        self.p.close()
        self.d.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(make_tiny_model("llama", Path(tmp_path_factory.mktemp("llama"))))


@pytest.fixture(scope="module")
def router(worker_launcher, model_dir):
    prefill = worker_launcher(
        "--role", "prefill", "--model-path", model_dir, "--kv-transfer-backend", "zmq", *COMMON_FLAGS
    )
    decode = worker_launcher(
        "--role", "decode", "--model-path", model_dir, "--kv-transfer-backend", "zmq",
        "--kv-transfer-timeout", "3", *COMMON_FLAGS,
    )  # fmt: skip
    assert "tcp://" in prefill.kv_address and "tcp://" in decode.kv_address  # plain, or tp-kv: JSON
    stub = RouterStub(prefill, decode)
    yield stub
    stub.close()


def test_greedy_output_and_logprobs_equal_the_mixed_engine(router, model_dir):
    shared = _prompt(48, seed=1)
    prompts = [_prompt(2, seed=2), _prompt(21, seed=3), _prompt(130, seed=4), shared + [7, 8], shared]
    params = {"temperature": 0.0, "max_new_tokens": 10}
    logprobs = {"return_logprob": True, "logprob_start_len": 0}
    mixed = Engine(EngineArgs(model_path=model_dir, device="cpu", dtype="float32", chunked_prefill_size=16))
    want = mixed.generate(prompts, params, **logprobs)
    for i, prompt in enumerate(prompts):
        router.submit(f"parity-{i}", prompt, sampling_params=params, **logprobs)
    for i, (prompt, w) in enumerate(zip(prompts, want)):
        got = router.result(f"parity-{i}")
        assert router.done[f"parity-{i}"].ok, router.done[f"parity-{i}"]
        assert got["output_ids"] == w["output_ids"], f"prompt {i}"
        for key in ("output_token_logprobs", "input_token_logprobs"):
            g, e = got["meta_info"][key], w["meta_info"][key]
            assert [t for _, t in g] == [t for _, t in e], f"prompt {i} {key}"
            g_lp = torch.tensor([float("nan") if lp is None else lp for lp, _ in g], dtype=torch.float64)
            e_lp = torch.tensor([float("nan") if lp is None else lp for lp, _ in e], dtype=torch.float64)
            assert torch.allclose(g_lp, e_lp, atol=1e-5, equal_nan=True), f"prompt {i} {key}"
        assert len(got["meta_info"]["input_token_logprobs"]) == len(prompt)
    # again without logprobs: P's radix cache now serves the prompts and D reports its hits
    router.submit("cached", prompts[2], sampling_params=params)
    again = router.result("cached")
    assert again["output_ids"] == want[2]["output_ids"]
    assert again["meta_info"]["cached_tokens"] == 128
    router.assert_idle()


def test_aborts_leave_both_workers_clean(router):
    params = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    # mid-prefill at P (a long prompt, aborted at once) and waiting for KV at D (P never hears of it)
    router.submit("long", _prompt(1000, seed=5), sampling_params=params)
    router.submit("orphan", _prompt(40, seed=6), to_prefill=False, sampling_params=params)
    router.abort("long", "client left")
    router.abort("orphan", "client left")
    # decoding at D
    router.submit("decoding", _prompt(30, seed=7), sampling_params=params)
    router.wait(lambda: len(router.outputs.get("decoding", [])) >= 3, what="decoding to start")
    router.abort("decoding", "client left")
    for rid in ("long", "orphan", "decoding"):
        router.wait(lambda rid=rid: router.finished(rid) is not None, what=rid)
        assert router.finished(rid).finish_reason == {"type": "abort", "message": "client left"}
    router.wait(lambda: "long" in router.done and "decoding" in router.done, what="PrefillDone")
    assert router.done["long"].ok is False and router.done["decoding"].ok is True
    assert "orphan" not in router.done  # P never held it, so it answers nothing (its abort is a no-op)
    router.assert_idle()


def test_a_prefill_that_never_comes_times_out_at_decode(router):
    router.submit("lost", _prompt(50, seed=8), to_prefill=False, sampling_params={"max_new_tokens": 5})
    router.wait(lambda: router.finished("lost") is not None, timeout_s=20.0, what="the timeout")
    reason = router.finished("lost").finish_reason
    assert reason["type"] == "abort" and reason["message"].startswith("KV transfer failed: ")
    assert "3 s" in reason["message"]
    router.assert_idle()


def test_each_role_refuses_the_request_kinds_it_does_not_serve_as_their_senders_expect(router):
    gen = GenerateRequest(rid="astray", input_ids=_prompt(8, seed=9))
    router.d.send(PrefillRequest(gen, router.d_kv))  # a PrefillRequest's sender waits for a PrefillDone
    router.wait(lambda: "astray" in router.done, 10.0, "the decode worker's PrefillDone")
    done = router.done.pop("astray")
    assert not done.ok and done.reason.startswith("A decode worker does not serve PrefillRequest")
    router.p.send(DecodeRequest(GenerateRequest(rid="astray2", input_ids=gen.input_ids), router.p_kv))
    router.p.send(GenerateRequest(rid="astray3", input_ids=gen.input_ids))
    for rid, kind in (("astray2", "DecodeRequest"), ("astray3", "GenerateRequest")):
        router.wait(lambda r=rid: router.finished(r) is not None, 10.0, f"the refusal of {rid}")
        assert (
            router.finished(rid).error
            == f"A prefill worker does not serve {kind}; it serves PrefillRequest only."
        )
    router.assert_idle()
