"""Jump-forward decoding in the engine (tiny random Llama with a byte-level tokenizer, CPU).

With one token per byte, a forced string leaves the grammar's mask exactly one token at each of its
positions, so an engine that jumps must produce what one that decodes every token produces, token
for token (seeded noise goes by (seed, step), not by the batch), only with fewer decode rows: that
checks the jumped tokens' KV, where the token after them is sampled, max_new_tokens and stop
tokens. Without `--enable-jump-forward` the engine keeps today's path: one decode row per output
token after the first. Also: streamed outputs add up to the final ids and counts; logprob requests never jump; the
decode worker of a P/D pair jumps after the prefill worker's first token.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer.fake import FakeKVManager, FakeTransferHub
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.protocol import GenerateRequest
from tests.helpers.pd_pair import PDPair, assert_idle

pytestmark = pytest.mark.untimed

# long forced runs: every key after its first byte, the const, the enum's tail
SCHEMA = {
    "type": "object",
    "properties": {
        "first_name_of_the_person": {"enum": ["alexander_the_great", "alexandra_the_wise"]},
        "age_in_whole_years": {"type": "integer", "minimum": 0, "maximum": 99},
        "membership_status": {"const": "active_member_of_the_club"},
    },
    "required": ["first_name_of_the_person", "age_in_whole_years", "membership_status"],
    "additionalProperties": False,
}
PROMPTS = [[ord(c) for c in f"Member record {i} as JSON: "] for i in range(4)]


def _args(model_dir: str, **extra) -> EngineArgs:
    return EngineArgs(
        model_path=model_dir,
        device="cpu",
        dtype="float32",
        chunked_prefill_size=16,
        max_total_tokens=8192,
        **extra,
    )


@pytest.fixture(scope="module")
def jumping(tiny_llama_dir) -> Engine:
    return Engine(_args(tiny_llama_dir, enable_jump_forward=True))


@pytest.fixture(scope="module")
def stepping(tiny_llama_dir) -> Engine:
    engine = Engine(_args(tiny_llama_dir))
    assert engine.scheduler.jumper is None
    return engine


def _params(seed: int, **extra) -> dict:
    return {
        "temperature": 1.0,
        "sampling_seed": seed,
        "max_new_tokens": 200,
        "json_schema": json.dumps(SCHEMA),
        **extra,
    }


def _run(engine: Engine, params: list[dict]) -> tuple[list[dict], int, int]:
    """Outputs, decode rows computed and tokens jumped by this run."""
    rows, jumped = engine.stats.decode_tokens_computed, engine.stats.jump_forward_tokens
    outs = engine.generate(PROMPTS[: len(params)], params)
    return outs, engine.stats.decode_tokens_computed - rows, engine.stats.jump_forward_tokens - jumped


def _text(out: dict) -> str:
    ids = out["output_ids"]
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        ids = ids[:-1]  # the stop token the grammar ended on
    return bytes(ids).decode("utf-8")


def test_jumping_equals_stepping_with_fewer_decode_rows(jumping, stepping):
    params = [_params(seed) for seed in range(4)]
    got, rows, jumped = _run(jumping, params)
    want, want_rows, want_jumped = _run(stepping, params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    for out in got:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])
        jsonschema.validate(json.loads(_text(out)), SCHEMA)
    num_tokens = sum(len(o["output_ids"]) for o in got)
    # stepping: the first token of each comes from its prefill, every other from one decode row
    assert want_jumped == 0 and want_rows == num_tokens - len(got)
    assert jumped > num_tokens // 3, (jumped, num_tokens)
    assert rows < want_rows - jumped // 2, (rows, want_rows, jumped)
    assert_idle(jumping)  # the pages of requests that jumped all came back


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 8, 13, 21, 34, 55])
def test_max_new_tokens_is_never_passed(jumping, stepping, max_new_tokens):
    params = [_params(seed, max_new_tokens=max_new_tokens) for seed in range(2)]
    got, _, _ = _run(jumping, params)
    want, _, _ = _run(stepping, params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    for out in got:
        assert len(out["output_ids"]) <= max_new_tokens
        if out["meta_info"]["finish_reason"]["type"] == "length":
            assert len(out["output_ids"]) == max_new_tokens


def test_a_forced_stop_token_ends_the_request_where_stepping_does(jumping, stepping):
    """`_` is forced inside the const and the enum: as a stop token it must end the request there."""
    params = [_params(seed, stop_token_ids=[ord("_")]) for seed in range(2)]
    got, _, _ = _run(jumping, params)
    want, _, _ = _run(stepping, params)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    for out in got:
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ord("_")}


def test_streamed_outputs_add_up_to_the_result(jumping):
    """Each output carries the tokens new since the last one (a jump's come at once) and counts all."""
    for i in range(2):
        jumping.add_request(
            GenerateRequest(rid=f"stream-{i}", input_ids=PROMPTS[i], sampling_params=_params(i))
        )
    streamed: dict[str, list[int]] = {"stream-0": [], "stream-1": []}
    sizes: list[int] = []
    while jumping.has_work():
        for out in jumping.step():
            streamed[out.rid] += out.token_ids
            sizes.append(len(out.token_ids))
            assert out.completion_tokens == len(streamed[out.rid])
    assert max(sizes) > 1  # some output carried a jump
    for i, rid in enumerate(streamed):
        (want,) = jumping.generate([PROMPTS[i]], [_params(i)])
        assert streamed[rid] == want["output_ids"]


def test_logprob_requests_do_not_jump(jumping):
    rows, jumped = jumping.stats.decode_tokens_computed, jumping.stats.jump_forward_tokens
    (out,) = jumping.generate([PROMPTS[0]], [_params(0)], return_logprob=True, top_logprobs_num=2)
    num_tokens = len(out["output_ids"])
    assert jumping.stats.jump_forward_tokens == jumped
    assert jumping.stats.decode_tokens_computed - rows == num_tokens - 1
    assert [t for _, t in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
    assert len(out["meta_info"]["output_top_logprobs"]) == num_tokens


def test_the_decode_worker_jumps_after_the_prefill_workers_token(tiny_llama_dir, stepping):
    hub = FakeTransferHub()
    on = _args(tiny_llama_dir, enable_jump_forward=True)  # on both: the prefill worker still never jumps
    prefill = PrefillEngine(on, lambda pool: FakeKVManager(pool, "prefill-0", hub))
    decode = DecodeEngine(
        _args(tiny_llama_dir, enable_jump_forward=True), lambda pool: FakeKVManager(pool, "decode-0", hub)
    )
    pair = PDPair(prefill, decode)
    try:
        params = _params(3)
        got = pair.generate(PROMPTS, params)
        want, _, _ = _run(stepping, [params] * len(PROMPTS))
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
        assert prefill.stats.jump_forward_tokens == 0 and decode.stats.jump_forward_tokens > 0
        pair.assert_idle()
    finally:
        prefill.kv_manager.close()
        decode.kv_manager.close()


def test_the_opt_in_flag_goes_from_serve_to_the_workers_engine_args():
    from pdserve.shared.args import engine_args_from
    from pdserve.shared.launch.serve.cli import build_parser as serve_parser
    from pdserve.shared.launch.serve.plan import engine_flags
    from pdserve.shared.launch.worker_cli import build_parser as worker_parser

    flags = engine_flags(serve_parser().parse_args(["--enable-jump-forward"]))
    assert "--enable-jump-forward" in flags
    assert engine_args_from(worker_parser().parse_args(["--role", "mixed", *flags])).enable_jump_forward
    assert not engine_args_from(worker_parser().parse_args(["--role", "mixed"])).enable_jump_forward


def test_samples_of_an_n_request_do_not_wait_for_a_jumping_first_sample(jumping, stepping):
    """Samples 1..n-1 wait for sample 0's prompt, not for its jumps: here sample 0 prefills again
    after every token it samples, and the others must still start before it ends."""
    params = {"temperature": 1.0, "sampling_seed": 5, "n": 4, "max_new_tokens": 80}
    params["regex"] = "(a|b)_first_forced_run_(c|d)_second_forced_run_(e|f)_third_forced_run!"
    (want,) = [stepping.generate([PROMPTS[0]], [params])]
    jumping.add_request(GenerateRequest(rid="n4", input_ids=PROMPTS[0], sampling_params=params))
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}
    others_began_before_the_first_ended = []
    while jumping.has_work():
        for out in jumping.step():
            if out.index and not streamed[out.index]:
                others_began_before_the_first_ended.append(len(streamed[0]) < len(want[0]["output_ids"]))
            streamed[out.index] += out.token_ids
    assert [streamed[i] for i in range(4)] == [o["output_ids"] for o in want]
    assert all(others_began_before_the_first_ended), others_began_before_the_first_ended
