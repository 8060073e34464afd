"""SGLang's sampling parameters `stop_regex` and `stream_interval` through a real router and worker.

The tiny model's tokenizer is byte-level and a strong `logit_bias` keeps its output to five ASCII
characters, so one token is one character and the expected stop is computed by brute force on the
unstopped output of the same seeded request:
- `stop_regex` ends the text where the first match begins (the match completes at the token the
  stream stops at; `no_stop_trim` keeps it), finish_reason {"type": "stop", "matched": <pattern>},
  and a stream never shows text a later match starts in;
- `stream_interval` N: the first token comes at once, then chunks of N tokens, the rest at the end;
- bad values are 400s naming the parameter.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import regex
import requests

from tests.helpers.router_http import assert_error, sse_chunks
from tests.helpers.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.untimed]

FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]
PROMPT = [(3 * i + 7) % 250 + 3 for i in range(10)]
ALPHABET = "ab12 "
SEEDED = {
    "temperature": 1.0,
    "sampling_seed": 11,
    "max_new_tokens": 60,
    "ignore_eos": True,
    "logit_bias": {str(ord(c)): 60.0 for c in ALPHABET},  # one ASCII character per token
}
PATTERNS = [r"\d \d", r"b\d{2}", r"a+b a", r"[12]{3}", r"2 ?a"]


@pytest.fixture(scope="module")
def router(worker_launcher, router_launcher, tmp_path_factory) -> str:
    model = make_tiny_model("llama", Path(tmp_path_factory.mktemp("sampling")))
    worker = worker_launcher("--model-path", str(model), *FLAGS).zmq_address
    return router_launcher("--worker-addr", worker).url


def generate(url: str, params: dict, stream: bool = False) -> requests.Response:
    return requests.post(
        url + "/generate",
        json={"input_ids": PROMPT, "sampling_params": params, "stream": stream},
        timeout=120,
    )


@pytest.fixture(scope="module")
def unstopped(router) -> str:
    resp = generate(router, SEEDED)
    assert resp.status_code == 200, resp.text
    text = resp.json()["text"]
    assert len(text) == SEEDED["max_new_tokens"] and set(text) <= set(ALPHABET), text
    return text


def first_stop(text: str, pattern: str) -> regex.Match | None:
    """The match a stream stops at: in the shortest prefix (one character per token) that has one."""
    compiled = regex.compile(pattern)
    return next((m for i in range(1, len(text) + 1) if (m := compiled.search(text[:i]))), None)


def test_stop_regex_ends_the_text_where_the_first_match_begins(router, unstopped):
    stops = [(p, m) for p in PATTERNS if (m := first_stop(unstopped, p)) is not None and m.end() < 50]
    assert stops, f"no pattern matches early in {unstopped!r}"
    for pattern, match in stops:
        resp = generate(router, {**SEEDED, "stop_regex": pattern})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["text"] == unstopped[: match.start()], (pattern, unstopped)
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
        assert out["meta_info"]["completion_tokens"] == match.end()  # stopped at the completing token

        kept = generate(router, {**SEEDED, "stop_regex": [pattern], "no_stop_trim": True}).json()
        assert kept["text"] == unstopped[: match.end()]


def test_stop_regex_stream_never_shows_text_a_match_starts_in(router, unstopped):
    pattern, match = next((p, m) for p in PATTERNS if (m := first_stop(unstopped, p)) and m.end() < 50)
    chunks = sse_chunks(generate(router, {**SEEDED, "stop_regex": pattern}, stream=True))[:-1]
    texts = [c["text"] for c in chunks]
    assert texts[-1] == unstopped[: match.start()]
    assert all(len(t) <= match.start() for t in texts)  # nothing past where the match begins, ever
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # and the text never shrinks
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}


def test_stream_interval_sends_the_first_token_then_every_n(router):
    params = {"temperature": 0.0, "max_new_tokens": 18, "ignore_eos": True}
    # the worker reports after the first token, then every `interval`, then at the end; a router
    # that catches up with a backlog may fold reports into one event, never split or shift one
    for interval, reports in ((4, [1, 5, 9, 13, 17, 18]), (1, list(range(1, 19))), (25, [1, 18])):
        chunks = sse_chunks(generate(router, {**params, "stream_interval": interval}, stream=True))[:-1]
        counts = [len(c["output_ids"]) for c in chunks]
        assert counts == sorted(set(counts)) and set(counts) <= set(reports), (interval, counts)
        assert counts[-1] == 18 and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_bad_values_are_400s_naming_the_parameter(router):
    bad = [
        ({"stop_regex": "(unclosed"}, "not a valid regular expression"),
        ({"stop_regex": 7}, "stop_regex must be a string or a list of strings"),
        ({"stop_regex": ["x"] * 17}, "more than the limit of 16"),
        ({"stream_interval": 0}, "stream_interval must be >= 1"),
        ({"stream_interval": "2"}, "stream_interval must be an integer"),
    ]
    for params, words in bad:
        assert_error(generate(router, params), 400, words)


def test_a_stop_regex_that_backtracks_without_end_is_a_400(router):
    params = {
        "max_new_tokens": 60,
        "temperature": 0.0,
        "ignore_eos": True,
        "logit_bias": {str(ord("a")): 80.0},
    }
    assert_error(generate(router, {**params, "stop_regex": r"(a|aa)+c"}), 400, "stop_regex", "took longer")
