"""The msgpack wire of shared/protocol/: every message round-trips with every field set;
OutputBatch sends outputs as rows; the P/D messages carry a GenerateRequest."""

import dataclasses

import msgpack
import pytest

from pdserve.shared.protocol import (
    _REGISTRY,
    DecodeRequest,
    GenerateRequest,
    OutputBatch,
    PrefillRequest,
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


# a value unlike the field's default for each annotation the messages use
_VALUES = {
    "str": "text",
    "int": 7,
    "bool": True,
    "list[int]": [1, 2],
    "list[float]": [0.5, -0.25],
    "list[str]": ["a", "b"],
    "list[Any]": [1, "a"],
    "list[list[Any]]": [[-0.5, 3]],
    "list[list[list[Any]]]": [[[-0.5, 3]]],
    "dict[str, Any]": {"k": [1, 2]},
    "str | bytes": b"bytes",
    "str | bytes | list[str | bytes]": ["entry", b"bytes"],
    "GenerateRequest": GenerateRequest(rid="inner", input_ids=[5], sampling_params={"n": 1}),
    "list[RequestOutput]": [_full_output()],
}


def _example(cls):
    """An instance of the message with every field set to a value other than its default."""
    return cls(**{f.name: _VALUES[f.type.removesuffix(" | None")] for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("tag", sorted(_REGISTRY))
def test_every_message_round_trips_with_every_field_set(tag):
    msg = _example(_REGISTRY[tag])
    assert decode(encode(msg)) == msg


def test_the_pd_messages_carry_a_generate_request():
    gen = GenerateRequest(rid="r", input_ids=[1, 2], sampling_params={"max_new_tokens": 3})
    for msg in (PrefillRequest(gen, "tcp://d:1", "d"), DecodeRequest(gen, "tcp://p:1", "p")):
        tag, data = msgpack.unpackb(encode(msg))
        assert tag == msg.TAG
        assert data["request"] == gen.to_wire() and "rid" not in data
        back = decode(encode(msg))
        assert type(back) is type(msg) and back.request == gen and back.request.request is back.request
    for bad in ({"decode_kv_endpoint": "x"}, {"request": "r", "decode_kv_endpoint": "x"},
                {"request": {"rid": "r"}, "decode_kv_endpoint": "x"}):  # fmt: skip
        with pytest.raises(ProtocolError):
            decode(msgpack.packb(["prefill", bad]))


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
