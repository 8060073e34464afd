"""router/cluster/output_merge.py: a stream's backlog folded into one output per sample, saying the same."""

from __future__ import annotations

from pdserve.router.cluster.output_merge import merge_outputs
from pdserve.shared.protocol import RequestOutput


def _out(token: int, index: int = 0, **fields) -> RequestOutput:
    return RequestOutput(rid="r", token_ids=[token], index=index, completion_tokens=token, **fields)


def test_one_output_is_untouched_and_a_backlog_folds_in_order():
    one = [_out(1)]
    assert merge_outputs(one) is one
    folded = merge_outputs([_out(1, prompt_tokens=5), _out(2, prompt_tokens=5), _out(3, prompt_tokens=5)])
    assert len(folded) == 1
    assert folded[0].token_ids == [1, 2, 3]
    assert (folded[0].completion_tokens, folded[0].prompt_tokens, folded[0].finished) == (3, 5, False)


def test_the_finish_of_the_newest_is_kept_and_nothing_folds_past_a_finish_or_an_error():
    reason = {"type": "length", "length": 2}
    (folded,) = merge_outputs([_out(1), _out(2, finished=True, finish_reason=reason)])
    assert folded.token_ids == [1, 2] and folded.finished and folded.finish_reason == reason
    after_finish = merge_outputs([_out(1, finished=True, finish_reason=reason), _out(2)])
    assert [o.token_ids for o in after_finish] == [[1], [2]]
    with_error = merge_outputs([_out(1), RequestOutput(rid="r", token_ids=[], finished=True, error="bad")])
    assert [o.error for o in with_error] == [None, "bad"]


def test_samples_of_an_n_request_fold_apart():
    folded = merge_outputs([_out(1, index=0), _out(1, index=1), _out(2, index=0), _out(2, index=1)])
    assert [(o.index, o.token_ids) for o in folded] == [(0, [1, 2]), (1, [1, 2])]


def test_logprobs_follow_their_tokens_and_input_logprobs_are_kept_from_the_first():
    first = _out(
        1,
        output_token_logprobs=[[-0.1, 1]],
        output_top_logprobs=[[[-0.1, 1]]],
        input_token_logprobs=[[None, 9]],
    )
    second = _out(2, output_token_logprobs=[[-0.2, 2]], output_top_logprobs=[[[-0.2, 2]]])
    (folded,) = merge_outputs([first, second])
    assert folded.output_token_logprobs == [[-0.1, 1], [-0.2, 2]]
    assert folded.output_top_logprobs == [[[-0.1, 1]], [[-0.2, 2]]]
    assert folded.input_token_logprobs == [[None, 9]]
    # a field present on one side only is never folded (the lists would no longer match the tokens)
    apart = merge_outputs([_out(1, output_token_logprobs=[[-0.1, 1]]), _out(2)])
    assert [o.token_ids for o in apart] == [[1], [2]]
