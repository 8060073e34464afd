"""The msgpack wire of shared/protocol.py: messages round-trip; OutputBatch sends outputs as rows."""

import msgpack
import pytest

from pdserve.shared.protocol import (
    GenerateRequest,
    OutputBatch,
    ProtocolError,
    RequestOutput,
    decode,
    encode,
    field_names,
)


def _full_output() -> RequestOutput:
    return RequestOutput(
        rid="r1",
        token_ids=[3, 4],
        index=1,
        finished=True,
        finish_reason={"type": "stop", "matched": 2},
        prompt_tokens=7,
        completion_tokens=2,
        cached_tokens=5,
        output_token_logprobs=[[-0.5, 3], [-0.25, 4]],
        output_top_logprobs=[[[-0.5, 3]], [[-0.25, 4]]],
        error=None,
    )


def test_messages_round_trip():
    req = GenerateRequest(
        rid="a", input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 4}, top_logprobs_num=2
    )
    assert decode(encode(req)) == req
    batch = OutputBatch(outputs=[_full_output(), RequestOutput(rid="r2", token_ids=[9])])
    assert decode(encode(batch)) == batch


def test_outputs_travel_as_rows_in_field_order():
    out = _full_output()
    _, data = msgpack.unpackb(encode(OutputBatch(outputs=[out])), raw=False)
    (row,) = data["outputs"]
    assert row == [getattr(out, name) for name in field_names(RequestOutput)]


def test_a_changed_field_keeps_its_place_in_the_row():
    out = RequestOutput(rid="wire-rid", token_ids=[1])
    out.rid = "client-rid"  # the router renames retried requests' outputs like this
    assert out.to_row()[field_names(RequestOutput).index("rid")] == "client-rid"


def test_a_short_row_takes_the_defaults_and_a_map_is_understood():
    short = msgpack.packb(
        [OutputBatch.TAG, {"outputs": [["r", [5]], {"rid": "m", "token_ids": [6], "finished": True}]}]
    )
    got = decode(short).outputs
    assert got == [
        RequestOutput(rid="r", token_ids=[5]),
        RequestOutput(rid="m", token_ids=[6], finished=True),
    ]


@pytest.mark.parametrize(
    "outputs",
    [
        [["r", [1]] + [None] * len(field_names(RequestOutput))],  # too many values
        [{"rid": "r", "token_ids": [1], "no_such_field": 1}],
        [[]],  # rid and token_ids missing
    ],
)
def test_malformed_outputs_are_a_protocol_error(outputs):
    with pytest.raises(ProtocolError):
        decode(msgpack.packb([OutputBatch.TAG, {"outputs": outputs}]))
