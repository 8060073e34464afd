"""The native stream's chunks: `SampleView.sse_chunk` is byte for byte `encode_event(to_dict())`.

Hypothesis drives a sample through several events (any text, ids, finish reasons, logprob fields,
batch index or none) and compares the incrementally built chunk with the plain JSON encoding.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.http.sse import encode_event
from pdserve.router.native.sample_view import SampleView
from pdserve.router.serving.generator_api import GenerateInput, SampleEvent

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
reasons = st.one_of(
    st.none(),
    st.fixed_dictionaries({"type": st.just("length"), "length": st.integers(0, 99)}),
    st.fixed_dictionaries({"type": st.just("stop"), "matched": st.one_of(st.integers(0, 9), texts)}),
    st.fixed_dictionaries({"type": st.just("abort"), "message": texts, "status_code": st.just(503)}),
)
pairs = st.lists(st.tuples(st.floats(-20, 0), st.integers(0, 99), st.one_of(st.none(), texts)), max_size=3)


@st.composite
def event_lists(draw) -> list[SampleEvent]:
    events, ids, text = [], [], ""
    for k in range(draw(st.integers(1, 5))):
        new = draw(st.lists(st.integers(0, 50_000), max_size=3))
        ids = ids + new
        text += draw(texts)
        last = k == 4 or draw(st.booleans())
        ev = SampleEvent(
            index=0,
            text=text,
            text_delta="",
            token_ids=new,
            output_ids=list(ids),
            finished=last,
            finish_reason=draw(reasons) if last else None,
            prompt_tokens=draw(st.integers(0, 9)),
            completion_tokens=len(ids),
            cached_tokens=draw(st.integers(0, 9)),
        )
        if draw(st.booleans()):
            ev.output_token_logprobs = [list(p) for p in draw(pairs)]
            ev.output_top_logprobs = [[list(p) for p in draw(pairs)] for _ in range(len(new))]
        events.append(ev)
        if last:
            break
    return events


@settings(max_examples=200, deadline=None)
@given(
    events=event_lists(),
    rid=texts.filter(bool),
    num_samples=st.sampled_from([1, 2]),
    logprobs=st.sampled_from([(False, 0), (True, 0), (True, 2)]),
    index=st.one_of(st.none(), st.integers(0, 7)),
    weight_version=texts,
)
def test_sse_chunk_equals_the_json_of_to_dict(events, rid, num_samples, logprobs, index, weight_version):
    return_logprob, top = logprobs
    inp = GenerateInput(rid=rid, input_ids=[1], return_logprob=return_logprob, top_logprobs_num=top)
    view = SampleView(inp, 1, num_samples, start=0.0, weight_version=weight_version)
    view._e2e_latency = lambda: 0.123456  # the same clock reading for both encodings
    for ev in events:
        view.update(ev)
        chunk = view.to_dict()
        if index is not None:
            chunk["index"] = index
        assert view.sse_chunk(index) == encode_event(chunk)
