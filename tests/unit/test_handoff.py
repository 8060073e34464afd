"""first_output between the roles: what the prefill side packs survives msgpack and lands in the decode
side's request exactly; anything that does not fit the request is refused before it changes it."""

from __future__ import annotations

import msgpack
import pytest

from pdserve.shared.engine.handoff import HandoffError, apply_first_output, first_output_of
from pdserve.shared.engine.request import Req
from pdserve.shared.engine.sampling_params import SamplingParams

VOCAB = 512


def _req(max_new: int = 8, return_logprob: bool = True, top: int = 2) -> Req:
    return Req(
        rid="r",
        input_ids=[5, 6, 7],
        params=SamplingParams(temperature=0.0, max_new_tokens=max_new),
        return_logprob=return_logprob,
        top_logprobs_num=top,
        logprob_start_len=0 if return_logprob else -1,
    )


def _wire(data: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(data, use_bin_type=True), raw=False, strict_map_key=False)


def _prefilled() -> Req:
    """The prefill side's request after its last chunk."""
    p = _req()
    p.output_ids = [42]
    p.cached_tokens = 16
    p.output_token_logprobs = [(-0.25, 42)]
    p.output_top_logprobs = [[(-0.25, 42), (-1.5, 9)]]
    p.input_token_logprobs = [(None, 5), (-2.0, 6), (-3.0, 7)]
    p.input_top_logprobs = [None, [(-0.5, 1), (-0.75, 6)], [(-0.1, 2), (-3.0, 7)]]
    return p


def test_round_trip_through_msgpack_lands_exactly():
    p = _prefilled()
    d = _req()
    apply_first_output(d, _wire(first_output_of(p)), VOCAB)
    assert d.output_ids == [42] and d.cached_tokens == 16 and d.input_logprobs_done
    assert not d.wants_input_logprobs  # decode never scores the prompt again
    for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs", "input_top_logprobs"):
        assert getattr(d, key) == getattr(p, key), key


def test_without_logprobs_only_the_token_and_cached_tokens_travel():
    p = _req(return_logprob=False)
    p.output_ids, p.cached_tokens = [3], 32
    data = first_output_of(p)
    assert data == {"token": 3, "cached_tokens": 32}
    d = _req(return_logprob=False)
    apply_first_output(d, _wire(data), VOCAB)
    assert d.output_ids == [3] and d.cached_tokens == 32 and d.output_token_logprobs == []


def test_prompt_scoring_carries_no_token():
    p = _req(max_new=0)
    p.input_token_logprobs = [(None, 5), (-1.0, 6), (-2.0, 7)]
    d = _req(max_new=0)
    apply_first_output(d, _wire(first_output_of(p)), VOCAB)
    assert d.output_ids == [] and d.input_token_logprobs == p.input_token_logprobs


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda data: data.update(token=VOCAB), "not a token id"),
        (lambda data: data.update(token="42"), "not a token id"),
        (lambda data: data.pop("token"), "not a token id"),
        (lambda data: data.update(output_token_logprobs=[]), "first token's logprob"),
        (lambda data: data.update(input_token_logprobs=[[None]]), "malformed logprobs"),
        (lambda data: data.update(output_top_logprobs=[["x"]]), "malformed logprobs"),
    ],
)
def test_a_first_output_that_does_not_fit_is_refused_and_changes_nothing(change, message):
    data = _wire(first_output_of(_prefilled()))
    change(data)
    d = _req()
    with pytest.raises(HandoffError, match=message):
        apply_first_output(d, data, VOCAB)
    assert d.output_ids == [] and d.output_token_logprobs == [] and not d.input_logprobs_done


def test_not_a_dict_and_a_token_for_prompt_scoring_are_refused():
    with pytest.raises(HandoffError, match="not a dict"):
        apply_first_output(_req(), [42], VOCAB)
    with pytest.raises(HandoffError, match="max_new_tokens 0"):
        apply_first_output(_req(max_new=0), {"token": 4, "cached_tokens": 0}, VOCAB)
