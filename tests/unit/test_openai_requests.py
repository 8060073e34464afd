"""The OpenAI layer's request side, pure: body parsing and validation -> GenerateInput, the context
budget, chat templates."""

from __future__ import annotations

import json

import pytest

from pdserve.router.openai.chat_template import chat_prompt_ids, normalize_messages, render_chat
from pdserve.router.openai.params import OpenAIRequestError
from pdserve.router.openai.protocol import (
    check_context,
    make_generate_input,
    parse_chat_request,
    parse_completion_request,
)
from tests.helpers.tiny_models import _byte_tokenizer

USER = [{"role": "user", "content": "hi"}]


def _error(fn, body) -> OpenAIRequestError:
    with pytest.raises(OpenAIRequestError) as info:
        fn(body)
    return info.value


# ---------------------------------------------------------------- completions parsing


def test_completion_prompt_forms():
    assert parse_completion_request({"prompt": "a"}).prompts == ["a"]
    assert parse_completion_request({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse_completion_request({"prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert parse_completion_request({"prompt": [[1, 2], [3]]}).prompts == [[1, 2], [3]]


@pytest.mark.parametrize(
    "prompt",
    [None, "", [], [""], [[]], [1, "a"], [[1, -2]], [True, 1], 7, {"text": "a"}],
)
def test_completion_bad_prompts(prompt):
    err = _error(parse_completion_request, {"prompt": prompt})
    assert err.status == 400 and err.param == "prompt" and "prompt" in err.message


def test_completion_defaults_and_mapping():
    req = parse_completion_request({"prompt": "x", "model": "anything"})
    assert req.max_tokens == 16 and req.n == 1 and req.logprobs is None and not req.echo
    assert req.sampling == {"n": 1}
    assert req.model == "anything" and not req.stream.stream

    body = {
        "prompt": "x",
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "presence_penalty": 0.3,
        "frequency_penalty": -0.2,
        "repetition_penalty": 1.1,
        "min_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [3],
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "seed": 42,
        "n": 3,
        "stop": "END",
        "logit_bias": {"5": -100},
        "user": "ignored",
        "logprobs": 2,
        "echo": True,
    }
    req = parse_completion_request(body)
    assert req.max_tokens == 7 and req.n == 3 and req.logprobs == 2 and req.echo
    assert req.sampling == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "presence_penalty": 0.3,
        "frequency_penalty": -0.2,
        "repetition_penalty": 1.1,
        "min_new_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [3],
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "sampling_seed": 42,
        "n": 3,
        "stop": ["END"],
        "logit_bias": {"5": -100},
    }


def test_null_fields_take_defaults():
    req = parse_completion_request({"prompt": "x", "max_tokens": None, "temperature": None, "stop": None})
    assert req.max_tokens == 16 and "temperature" not in req.sampling and "stop" not in req.sampling


def test_stop_list_drops_empty_strings():
    assert parse_completion_request({"prompt": "x", "stop": ["a", "", "b"]}).sampling["stop"] == ["a", "b"]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"temperature": -1}, "temperature", "temperature must be in [0, inf)"),
        ({"temperature": "hot"}, "temperature", "temperature must be a finite number"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k", "top_k must be -1"),
        ({"presence_penalty": 3}, "presence_penalty", "presence_penalty must be in [-2, 2]"),
        ({"max_tokens": -1}, "max_tokens", "max_tokens must be >= 0"),
        ({"max_tokens": 1.5}, "max_tokens", "max_tokens must be an integer"),
        ({"n": 0}, "n", "n must be >= 1"),
        ({"n": 1000}, "n", "n must be <= 128"),
        ({"seed": "x"}, "seed", "seed must be an integer"),
        ({"stop": [1]}, "stop", "stop must be a string or a list of strings"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens", "min_tokens must be <= max_tokens"),
        ({"logprobs": 21}, "logprobs", "logprobs must be <= 20"),
        ({"logprobs": True}, "logprobs", "logprobs must be an integer"),
        ({"echo": "yes"}, "echo", "echo must be a boolean"),
        ({"stream": 1}, "stream", "stream must be a boolean"),
        ({"suffix": "tail"}, "suffix", "suffix is not supported"),
        ({"regex": 3}, "regex", "regex must be a string"),
        ({"json_schema": "{"}, "json_schema", "json_schema is not valid JSON"),
        ({"regex": "a", "ebnf": "x"}, "regex", "Only one of"),
        ({"structural_tag": {"format": {}}}, "structural_tag", "structural_tag must be a string"),
        ({"response_format": {"type": "xml"}}, "response_format", "must be 'text', 'json_object'"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"model": 3}, "model", "model must be a string"),
        ({"rid": ["a", "b"]}, "rid", "rid must be"),
    ],
)
def test_completion_bad_values_name_the_param(extra, param, words):
    err = _error(parse_completion_request, {"prompt": "x", **extra})
    assert err.status == 400 and err.param == param and words in err.message, err.message


def test_body_must_be_an_object():
    assert "JSON object" in _error(parse_completion_request, ["prompt"]).message
    assert "JSON object" in _error(parse_chat_request, "hi").message


def test_stream_options():
    req = parse_completion_request(
        {
            "prompt": "x",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
    )
    assert req.stream.stream and req.stream.include_usage and req.stream.continuous_usage_stats
    req = parse_completion_request({"prompt": "x", "stream": True})
    assert req.stream.stream and not req.stream.include_usage


LEGACY_TAG = {
    "type": "structural_tag",
    "structures": [{"begin": "<f=a>", "schema": {"type": "integer"}, "end": "</f>"}],
    "triggers": ["<f="],
}
FORMAT_TAG = {"type": "structural_tag", "format": {"type": "any_text"}}


def test_response_format_text_is_accepted():
    parse_chat_request({"messages": USER, "response_format": {"type": "text"}})


ORDERED = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "string"}}}


@pytest.mark.parametrize(
    "extra,want",
    [
        ({"response_format": {"type": "json_object"}}, {"json_schema": '{"type": "object"}'}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "strict": True, "schema": {"type": "integer"}},
                }
            },
            {"json_schema": '{"type": "integer"}'},
        ),
        (  # properties keep their order: the model writes them in it
            {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": ORDERED}}},
            {"json_schema": json.dumps(ORDERED)},
        ),
        ({"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
        ({"ebnf": 'root ::= "a"'}, {"ebnf": 'root ::= "a"'}),
        ({"response_format": LEGACY_TAG}, {"structural_tag": json.dumps(LEGACY_TAG)}),
        ({"response_format": FORMAT_TAG}, {"structural_tag": json.dumps(FORMAT_TAG)}),
        ({"structural_tag": json.dumps(FORMAT_TAG)}, {"structural_tag": json.dumps(FORMAT_TAG)}),
    ],
)
def test_constraints_become_sampling_params(extra, want):
    """Every constrained form reaches the workers as one native grammar field."""
    req = parse_chat_request({"messages": USER, **extra})
    assert {k: req.sampling[k] for k in want} == want


# ---------------------------------------------------------------- chat parsing


def test_chat_messages_normalised():
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "name": "x",
        },
        {"role": "assistant", "content": None},
        {"role": "user", "content": "c"},
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "c"},
    ]


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        (None, "messages is required"),
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        (["hi"], "messages[0] must be an object"),
        ([{"role": "function", "content": "x"}], "role 'function' is not supported"),
        ([{"content": "x"}], "role None is not supported"),
        ([{"role": "user", "content": 5}], "string or a list of content parts"),
        ([{"role": "user", "content": None}], "string or a list of content parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "function.name"),
    ],
)
def test_chat_bad_messages(messages, words):
    err = _error(parse_chat_request, {"messages": messages})
    assert err.status == 400 and err.param == "messages" and words in err.message, err.message


def test_chat_max_tokens_and_logprobs():
    req = parse_chat_request({"messages": USER})
    assert req.max_tokens is None and not req.logprobs and req.top_logprobs == 0 and req.add_generation_prompt
    assert parse_chat_request({"messages": USER, "max_tokens": 9}).max_tokens == 9
    assert parse_chat_request({"messages": USER, "max_tokens": 9, "max_completion_tokens": 4}).max_tokens == 4
    req = parse_chat_request({"messages": USER, "logprobs": True, "top_logprobs": 3, "seed": 1})
    assert req.logprobs and req.top_logprobs == 3 and req.sampling["sampling_seed"] == 1


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20"),
        ({"max_completion_tokens": -3}, "max_completion_tokens", ">= 0"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools", "function.name"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format",
            "'schema' object",
        ),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "response_format", "cannot be combined"),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "'structures' and 'triggers'"),
        ({"response_format": FORMAT_TAG, "ebnf": "x"}, "response_format", "cannot be combined"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "must be an object"),
        ({"continue_final_message": True}, "continue_final_message", "final assistant message"),
    ],
)
def test_chat_bad_values(extra, param, words):
    err = _error(parse_chat_request, {"messages": USER, **extra})
    assert err.status == 400 and err.param == param and words in err.message, err.message


# ---------------------------------------------------------------- GenerateInput


def test_make_generate_input_fields():
    inp = make_generate_input("r1", [1, 2, 3], {"stop": ["x"], "n": 2}, 5, 100)
    assert inp.rid == "r1" and inp.input_ids == [1, 2, 3]
    assert inp.sampling_params == {"stop": ["x"], "n": 2, "max_new_tokens": 5}
    assert not inp.return_logprob and inp.top_logprobs_num == 0 and inp.logprob_start_len == -1

    inp = make_generate_input("r", [1, 2], {}, 4, 100, top_logprobs=3)
    assert inp.return_logprob and inp.top_logprobs_num == 3 and inp.logprob_start_len == -1
    assert inp.return_text_in_logprobs
    inp = make_generate_input("r", [1, 2], {}, 4, 100, top_logprobs=0, prompt_logprobs=True)
    assert inp.return_logprob and inp.top_logprobs_num == 0 and inp.logprob_start_len == 0
    # echo without logprobs asks for no prompt logprobs
    assert make_generate_input("r", [1], {}, 4, 100, None, prompt_logprobs=True).logprob_start_len == -1


def test_chat_budget_is_the_rest_of_the_context():
    # like SGLang, prompt + max_new_tokens stays below the context length
    assert make_generate_input("r", [1] * 30, {}, None, 100).sampling_params["max_new_tokens"] == 69
    assert check_context(99, None, 100) == 0
    assert check_context(90, 9, 100) == 9


def test_context_overflow_states_both_numbers():
    with pytest.raises(OpenAIRequestError) as info:
        check_context(90, 10, 100)
    msg = info.value.message
    assert info.value.status == 400 and info.value.param == "max_tokens"
    assert (
        "context length of 100 tokens" in msg and "90 tokens from the input" in msg and "10 tokens for" in msg
    )
    with pytest.raises(OpenAIRequestError) as info:
        check_context(100, None, 100)
    assert (
        info.value.message == "The input (100 tokens) is longer than the model's context length (100 tokens)."
    )


# ---------------------------------------------------------------- chat template


@pytest.fixture(scope="module")
def tokenizer():
    return _byte_tokenizer()


def test_render_with_the_tokenizer_template(tokenizer):
    text = render_chat(tokenizer, [{"role": "system", "content": "s"}, *USER], None)
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_prompt_ids(tokenizer, text)
    assert ids[0] == 257 and ids[-1] == ord("\n") and ids.count(258) == 2  # <|im_start|>, ..., <|im_end|>
    cont = render_chat(
        tokenizer,
        [*USER, {"role": "assistant", "content": "Hel"}],
        None,
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert cont.endswith("<|im_start|>assistant\nHel")


def test_render_with_a_given_template(tokenizer):
    plain = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>>"
    assert render_chat(tokenizer, USER, plain) == "[user] hi\n>>"
    kwargs = "{{ messages[0]['content'] }}{% if shout %}!{% endif %}"
    assert render_chat(tokenizer, USER, kwargs, template_kwargs={"shout": True}) == "hi!"


def test_template_errors_are_400(tokenizer):
    failing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(OpenAIRequestError, match="could not render these messages: only user turns"):
        render_chat(tokenizer, USER, failing)
    with pytest.raises(OpenAIRequestError, match="could not render"):
        render_chat(tokenizer, USER, None, template_kwargs={"messages": []})  # clashes with an argument


def test_no_template_anywhere(tokenizer):
    bare = _byte_tokenizer()
    bare.chat_template = None
    with pytest.raises(OpenAIRequestError, match="--chat-template"):
        render_chat(bare, USER, None)
