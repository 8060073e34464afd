"""router/text/tokenizer_fast.py: the direct backend calls give exactly what transformers gives.

Hypothesis-chosen texts (special-token strings, digits, spaces, any unicode) and id lists, on the
tiny byte-level tokenizer and SmolLM2's BPE; plus the per-call fallback when the backend carries a
truncation setting that transformers would have reset.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.router.text.detokenizer import decode_ids
from pdserve.router.text.tokenizer_fast import _is_plain_backend, fast_decoder, fast_encoder
from tests.helpers.tiny_models import _byte_tokenizer


@functools.cache
def byte_tokenizer():
    return _byte_tokenizer()


@functools.cache
def smollm2_tokenizer():
    from pdserve.shared.tokenizer import get_tokenizer

    return get_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


TOKENIZERS = {"bytes": byte_tokenizer, "smollm2": smollm2_tokenizer}
texts = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", " 12345", "  \n\t", "é€😀"]),
    ),
    max_size=6,
).map("".join)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_both_tokenizers_take_the_fast_paths(name):
    cls = type(TOKENIZERS[name]())
    assert _is_plain_backend(cls, "_encode_plus", "encode") and _is_plain_backend(cls, "_decode", "decode")


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(text=texts, add_special=st.booleans())
def test_fast_encoder_equals_encode(name, text, add_special):
    tok = TOKENIZERS[name]()
    assert fast_encoder(tok, add_special)(text) == tok.encode(text, add_special_tokens=add_special)


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_fast_decoder_equals_decode_ids(name, data, skip):
    tok = TOKENIZERS[name]()
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=12))
    assert fast_decoder(tok)(ids, skip) == decode_ids(tok, ids, skip)


def test_fast_encoder_defers_to_transformers_when_the_backend_truncates():
    tok = _byte_tokenizer()  # a fresh one: this test changes its backend
    tok.backend_tokenizer.enable_truncation(max_length=3)
    encode = fast_encoder(tok)
    assert encode("hello world") == tok.encode("hello world") == list(b"hello world")
