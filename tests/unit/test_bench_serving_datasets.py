"""bench_serving's datasets without a server: lengths, random ids and text, generated shared prefixes,
ShareGPT parsing, chat templates, arrival times, and the dataset the command line builds.

Datasets use the tiny models' byte-level tokenizer (one token per UTF-8 byte, 3 special tokens), so
lengths can be checked exactly.
"""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench import serving_datasets as ds
from pdserve.bench.bench_serving import arrival_offsets, build_parser

SHAREGPT = Path(__file__).parent / "data" / "sharegpt_small.json"


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- datasets


def test_sample_lengths_stay_in_range():
    lens = ds.sample_lengths(rng(), 100, 0.5, 2000)
    assert min(lens) == 50 and max(lens) == 100  # both ends reached with 2000 draws over 51 values
    assert ds.sample_lengths(rng(), 7, 1.0, 5) == [7] * 5
    assert set(ds.sample_lengths(rng(), 3, 0.0, 300)) == {1, 2, 3}
    with pytest.raises(ValueError):
        ds.sample_lengths(rng(), 10, 1.5, 1)


def test_random_ids_have_exact_lengths_and_no_special_tokens(tok):
    rows = ds.random_rows(tok, 20, 40, 12, 0.5, rng(3), as_ids=True)
    assert len(rows) == 20
    for row in rows:
        assert isinstance(row.prompt, list) and len(row.prompt) == row.prompt_len
        assert 20 <= row.prompt_len <= 40 and 6 <= row.output_len <= 12
        assert all(0 <= i < 256 for i in row.prompt)  # the byte tokenizer's 256 bytes, no 256..258
    again = ds.random_rows(tok, 20, 40, 12, 0.5, rng(3), as_ids=True)
    assert [r.prompt for r in again] == [r.prompt for r in rows]
    other = ds.random_rows(tok, 20, 40, 12, 0.5, rng(4), as_ids=True)
    assert [r.prompt for r in other] != [r.prompt for r in rows]


def test_random_text_rows_count_the_reencoded_prompt(tok):
    rows = ds.random_rows(tok, 10, 16, 8, 1.0, rng(1), as_ids=False)
    for row in rows:
        assert isinstance(row.prompt, str)
        assert row.prompt_len == len(tok.encode(row.prompt))
        assert row.prompt_len >= 16  # invalid UTF-8 bytes come back as 3-byte U+FFFD, never fewer
        assert row.output_len == 8


def test_generated_shared_prefix_structure(tok):
    rows = ds.generated_shared_prefix_rows(tok, 3, 4, 64, 8, 5, rng(7))
    assert len(rows) == 12
    assert all(r.output_len == 5 for r in rows)
    assert all(r.prompt_len == len(tok.encode(r.prompt)) for r in rows)
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r.prompt[:24], []).append(r.prompt)
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4]
    for prompts in groups.values():
        shared = os.path.commonprefix(prompts)
        # the whole system prompt (64 random bytes decode to >= 64 / 3 characters) is shared
        assert len(shared) >= 64 // 3
        assert len(set(prompts)) == 4  # questions differ
    keys = [r.prompt[:24] for r in rows]
    assert keys != sorted(keys, key=list(dict.fromkeys(keys)).index)  # shuffled, not group by group


def test_sharegpt_parsing_and_filters(tok):
    rows = ds.sharegpt_rows(tok, SHAREGPT, 10, rng(0), context_len=80)
    by_prompt = {r.prompt: r for r in rows}
    assert set(by_prompt) == {"What is the capital of France?", "Name a color.", "Say hello."}
    assert by_prompt["What is the capital of France?"].prompt_len == 30
    assert by_prompt["What is the capital of France?"].output_len == len("Paris is the capital.")
    assert by_prompt["Name a color."].output_len == len("Blue.")  # only the first two turns
    assert by_prompt["Say hello."].output_len == len("Hello there!")  # role/content records too
    fixed = ds.sharegpt_rows(tok, SHAREGPT, 10, rng(0), fixed_output_len=7, context_len=80)
    assert len(fixed) == 4 and all(r.output_len == 7 for r in fixed)  # the long one fits now
    assert len(ds.sharegpt_rows(tok, SHAREGPT, 2, rng(0))) == 2
    order_a = [r.prompt for r in ds.sharegpt_rows(tok, SHAREGPT, 10, rng(1))]
    order_b = [r.prompt for r in ds.sharegpt_rows(tok, SHAREGPT, 10, rng(1))]
    assert order_a == order_b and len(order_a) == 4
    with pytest.raises(FileNotFoundError):
        ds.sharegpt_rows(tok, SHAREGPT.with_name("missing.json"), 1, rng())


def test_apply_chat_template(tok):
    rows = [ds.DatasetRow("Hi", 2, 4)]
    sent = ds.apply_chat_template(rows, tok, send_templated=True)[0]
    assert sent.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"[len("<|im_start|>") :]
    kept = ds.apply_chat_template(rows, tok, send_templated=False)[0]
    assert kept.prompt == "Hi" and kept.prompt_len == len(tok.encode(sent.prompt)) and kept.output_len == 4
    with pytest.raises(TypeError):
        ds.apply_chat_template([ds.DatasetRow([1, 2], 2, 4)], tok, send_templated=True)


def test_arrival_offsets():
    assert arrival_offsets(4, float("inf"), rng()) == [0.0] * 4
    offs = arrival_offsets(4000, 50.0, rng(5))
    assert offs[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(offs))
    assert offs[-1] / 3999 == pytest.approx(1 / 50.0, rel=0.06)  # mean gap 1/rate
    assert arrival_offsets(4000, 50.0, rng(5)) == offs


def _dataset(tok, *flags: str) -> list[ds.DatasetRow]:
    from pdserve.bench.bench_serving import build_dataset

    ns = build_parser().parse_args(
        ["--num-prompts", "5", "--random-input-len", "12", "--random-output-len", "4", *flags]
    )
    return build_dataset(ns, tok)


def test_random_ids_send_text_unless_tokenize_prompt_as_sglangs_client(tok):
    text_rows = _dataset(tok, "--dataset-name", "random-ids")
    id_rows = _dataset(tok, "--dataset-name", "random-ids", "--tokenize-prompt")
    assert all(isinstance(r.prompt, str) for r in text_rows)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in id_rows)
    assert [tok.decode(r.prompt) for r in id_rows] == [r.prompt for r in text_rows]  # the same draws
    assert all(
        isinstance(r.prompt, str)
        for r in _dataset(tok, "--dataset-name", "random-ids", "--backend", "sglang-oai-chat")
    )
    with pytest.raises(SystemExit, match="--tokenize-prompt"):
        _dataset(tok, "--dataset-name", "random-ids", "--tokenize-prompt", "--backend", "sglang-oai-chat")


def test_random_takes_its_ids_from_sharegpt_prompts(tok):
    rows = _dataset(tok, "--dataset-name", "random", "--dataset-path", str(SHAREGPT), "--tokenize-prompt")
    turns = [ds._first_two_turns(r) for r in json.loads(SHAREGPT.read_text()) if isinstance(r, dict)]
    prompts = [tok.encode(t[0], add_special_tokens=False) for t in turns if t is not None]
    assert len(rows) == 5
    for row in rows:
        assert len(row.prompt) == row.prompt_len and 1 <= row.prompt_len <= 12
        # each row is one prompt's ids, repeated or cut to the drawn length
        assert any(row.prompt == (p * (row.prompt_len // len(p) + 1))[: row.prompt_len] for p in prompts if p)
