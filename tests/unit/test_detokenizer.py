"""Incremental detokenizer: streamed pieces concatenate to the tokenizer's full decode.

Checked with the tiny byte-level tokenizer (one token per byte, so multi-byte characters are cut
between tokens on purpose) and SmolLM2's real BPE tokenizer, over hypothesis-chosen id sequences
and chunkings, with and without special tokens skipped; plus the hold-back of an incomplete
character and its release at finish.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.text.detokenizer import IncrementalDetokenizer, decode_ids
from tests.helpers.tiny_models import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, _byte_tokenizer


@functools.cache
def byte_tokenizer():
    return _byte_tokenizer()


@functools.cache
def smollm2_tokenizer():
    from pdserve.shared.tokenizer import get_tokenizer

    return get_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


def stream_text(tokenizer, ids: list[int], chunks: list[int], skip: bool) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = []
    pos = 0
    for size in chunks:
        if pos >= len(ids):
            break
        pieces.append(detok.add(ids[pos : pos + size]))
        pos += size
    pieces.append(detok.add(ids[pos:]))
    pieces.append(detok.finish())
    assert detok.text == "".join(pieces)
    return detok.text, pieces


def test_multibyte_character_is_held_until_complete():
    tok = byte_tokenizer()
    euro = list("€".encode())  # 3 bytes, 3 tokens
    detok = IncrementalDetokenizer(tok)
    assert detok.add([ord("a")]) == "a"
    assert detok.add(euro[:1]) == ""
    assert detok.add(euro[1:2]) == ""
    assert detok.add(euro[2:]) == "€"
    assert detok.add([ord("!")]) == "!"
    assert detok.finish() == ""
    assert detok.text == "a€!"


def test_finish_releases_an_incomplete_character_as_replacement():
    tok = byte_tokenizer()
    detok = IncrementalDetokenizer(tok)
    assert detok.add([ord("x")]) == "x"
    assert detok.add([0xE2, 0x82]) == ""
    rest = detok.finish()
    assert detok.text == decode_ids(tok, [ord("x"), 0xE2, 0x82])
    assert rest.endswith("\ufffd")


def test_special_tokens_skipped_or_kept():
    tok = byte_tokenizer()
    ids = [IM_START_ID, ord("h"), ord("i"), IM_END_ID, ENDOFTEXT_ID]
    assert stream_text(tok, ids, [1] * 5, skip=True)[0] == "hi"
    assert stream_text(tok, ids, [1] * 5, skip=False)[0] == "<|im_start|>hi<|im_end|><|endoftext|>"


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(
        st.one_of(st.integers(0, 255), st.sampled_from([ENDOFTEXT_ID, IM_START_ID, IM_END_ID])),
        max_size=40,
    ),
    chunks=st.lists(st.integers(1, 4), max_size=40),
    skip=st.booleans(),
)
def test_byte_tokenizer_stream_equals_full_decode(ids, chunks, skip):
    tok = byte_tokenizer()
    text, _ = stream_text(tok, ids, chunks, skip)
    assert text == decode_ids(tok, ids, skip)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    text=st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Co", "Cn"), max_codepoint=0x1F600),
        max_size=60,
    ),
    chunks=st.lists(st.integers(1, 3), max_size=60),
)
def test_smollm2_stream_of_encoded_text_round_trips(text, chunks):
    tok = smollm2_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    # special tokens kept: text that spells one ("<|im_start|>") encodes to it and must come back
    streamed, pieces = stream_text(tok, ids, chunks, skip=False)
    assert streamed == decode_ids(tok, ids, skip_special_tokens=False) == text
    assert all("\ufffd" not in p for p in pieces)  # held back, never shown half-decoded


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=30), skip=st.booleans())
def test_smollm2_stream_of_random_ids_equals_full_decode(ids, skip):
    tok = smollm2_tokenizer()
    text, _ = stream_text(tok, ids, [1] * len(ids), skip)
    assert text == decode_ids(tok, ids, skip)
