"""Prompts for `bench_serving`: the datasets of SGLang's bench_serving, built locally (no downloads).

Every dataset is a list of `DatasetRow(prompt, prompt_len, output_len)`; `prompt` is text, or token
ids with `--tokenize-prompt`. Rules:
- random-ids: per row an input length drawn uniformly from [max(int(L * ratio), 1), L] (L =
  `--random-input-len`, ratio = `--random-range-ratio`) and an output length the same way; the prompt
  is that many random token ids (special tokens excluded) decoded to text, as SGLang does. Decoding
  and re-encoding does not keep the count exactly, so `prompt_len` is the re-encoded length: what
  the server will see. With `--tokenize-prompt` the ids are sent as ids (`input_ids` to /generate,
  a token list as an OpenAI `prompt`), and `prompt_len` is exactly the drawn length.
- random: as SGLang, the ids come from ShareGPT prompts (`--dataset-path`), each prompt's ids
  repeated or cut to the drawn length; bench_serving downloads nothing, so without a file the ids
  are random as in random-ids (a note says so).
- generated-shared-prefix (gsp): `num_groups` random system prompts of `system_prompt_len` tokens,
  each followed by `prompts_per_group` random questions of `question_len` tokens; every row asks
  `output_len` tokens. Rows are shuffled; `--num-prompts` is ignored (groups x prompts per group).
- sharegpt: a local ShareGPT JSON file (a list of {"conversations": [{"from", "value"}, ...]}, or
  "messages" of {"role", "content"}): the first turn is the prompt, the second the reference
  completion whose token count is the output length (unless a fixed output length is given).
  Conversations with fewer than two turns, a prompt or completion under 2 tokens, or more than
  `context_len` tokens in all are skipped; the order is shuffled with the seed.
All randomness comes from one `numpy.random.Generator` seeded by `--seed`: equal seeds, equal rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASET_NAMES = ("random", "random-ids", "generated-shared-prefix", "sharegpt")
MIN_SHAREGPT_TOKENS = 2


@dataclass
class DatasetRow:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def sample_lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int) -> list[int]:
    """n lengths uniform in [max(int(length * range_ratio), 1), length] (both ends included)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    low = max(int(length * range_ratio), 1)
    return [int(x) for x in rng.integers(low, length + 1, size=n)]


def ordinary_token_ids(tokenizer) -> np.ndarray:
    """The ids random prompts draw from: the whole vocabulary less the special tokens."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)


def random_token_ids(rng: np.random.Generator, pool: np.ndarray, n: int) -> list[int]:
    return [int(x) for x in pool[rng.integers(0, len(pool), size=n)]]


def encoded_len(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def random_rows(
    tokenizer,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    as_ids: bool,
) -> list[DatasetRow]:
    """The random (text) or random-ids dataset; see the module docstring."""
    pool = ordinary_token_ids(tokenizer)
    input_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    rows = []
    for n_in, n_out in zip(input_lens, output_lens):
        ids = random_token_ids(rng, pool, n_in)
        if as_ids:
            rows.append(DatasetRow(ids, n_in, n_out))
        else:
            text = tokenizer.decode(ids)
            rows.append(DatasetRow(text, encoded_len(tokenizer, text), n_out))
    return rows


def sharegpt_token_rows(
    tokenizer,
    path: str | Path,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    as_ids: bool,
) -> list[DatasetRow]:
    """The random dataset from ShareGPT prompts: each row's ids are a prompt's ids, repeated or cut
    to the drawn input length (prompts that encode to nothing are skipped)."""
    pairs = [p for p in (_first_two_turns(r) for r in _load_records(Path(path))) if p is not None]
    order = rng.permutation(len(pairs))
    input_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    rows: list[DatasetRow] = []
    for k in order:
        if len(rows) == num_prompts:
            break
        ids = tokenizer.encode(pairs[k][0], add_special_tokens=False)
        if not ids:
            continue
        n_in, n_out = input_lens[len(rows)], output_lens[len(rows)]
        ids = (ids * (n_in // len(ids) + 1))[:n_in]
        if as_ids:
            rows.append(DatasetRow(ids, n_in, n_out))
        else:
            text = tokenizer.decode(ids)
            rows.append(DatasetRow(text, encoded_len(tokenizer, text), n_out))
    return rows


def generated_shared_prefix_rows(
    tokenizer,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    rng: np.random.Generator,
) -> list[DatasetRow]:
    """The gsp dataset: prompt = system prompt of its group + "\\n\\n" + its own question; shuffled."""
    pool = ordinary_token_ids(tokenizer)
    rows = []
    for _ in range(num_groups):
        system = tokenizer.decode(random_token_ids(rng, pool, system_prompt_len))
        for _ in range(prompts_per_group):
            question = tokenizer.decode(random_token_ids(rng, pool, question_len))
            prompt = f"{system}\n\n{question}"
            rows.append(DatasetRow(prompt, encoded_len(tokenizer, prompt), output_len))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _first_two_turns(record: dict[str, Any]) -> tuple[str, str] | None:
    """(prompt, completion) of a ShareGPT record, or None when it has fewer than two text turns."""
    turns = record.get("conversations") or record.get("conversation") or record.get("messages") or []
    texts = []
    for turn in turns[:2]:
        if isinstance(turn, dict):
            value = turn.get("value", turn.get("content"))
            if isinstance(value, str):
                texts.append(value)
    return (texts[0], texts[1]) if len(texts) == 2 else None


def _load_records(path: Path) -> list[dict[str, Any]]:
    """The conversations of a local ShareGPT file (records that are not objects are left out)."""
    if not path.is_file():
        raise FileNotFoundError(f"--dataset-path {path}: no such file (bench_serving downloads nothing)")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise TypeError(f"{path}: a ShareGPT file is a JSON list of conversations")
    return [r for r in records if isinstance(r, dict)]


def sharegpt_rows(
    tokenizer,
    path: str | Path,
    num_prompts: int,
    rng: np.random.Generator,
    fixed_output_len: int | None = None,
    context_len: int | None = None,
) -> list[DatasetRow]:
    """Up to num_prompts rows from a local ShareGPT file (see the module docstring for the filters)."""
    pairs = [p for p in (_first_two_turns(r) for r in _load_records(Path(path))) if p is not None]
    rows: list[DatasetRow] = []
    for i in rng.permutation(len(pairs)):
        if len(rows) == num_prompts:
            break
        prompt, completion = pairs[i]
        prompt_len = encoded_len(tokenizer, prompt)
        if fixed_output_len is not None:
            out_len = fixed_output_len
        else:
            out_len = len(tokenizer.encode(completion, add_special_tokens=False))
        if prompt_len < MIN_SHAREGPT_TOKENS or out_len < MIN_SHAREGPT_TOKENS:
            continue
        if context_len is not None and prompt_len + out_len > context_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, out_len))
    return rows


def apply_chat_template(rows: list[DatasetRow], tokenizer, send_templated: bool) -> list[DatasetRow]:
    """Rows whose text prompts are wrapped as one user turn of the model's chat template.

    prompt_len becomes the templated length either way. With send_templated the templated text is
    sent (completion backends); without, the raw text is kept because the server applies the
    template itself (chat backend). A BOS the template writes is removed from the sent text: the
    server's tokenizer adds its own."""
    out = []
    for row in rows:
        if not isinstance(row.prompt, str):
            raise TypeError("--apply-chat-template needs text prompts, not token ids")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], tokenize=False, add_generation_prompt=True
        )
        bos = tokenizer.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        out.append(
            DatasetRow(text if send_templated else row.prompt, encoded_len(tokenizer, text), row.output_len)
        )
    return out
