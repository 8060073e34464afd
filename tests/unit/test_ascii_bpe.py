"""router/text/ascii_bpe.py: ASCII text encoded without the Rust pre-tokenizer gives the backend's ids.

Hypothesis-chosen ASCII texts (every ASCII character, GPT-2's contractions, digits, whitespace runs,
special-token strings) on SmolLM2's BPE (Digits then ByteLevel) and the tiny byte-level tokenizer
(ByteLevel alone), with and without special tokens; templates with special tokens around the text;
added tokens matched in the backend's two passes; what is not supported gives None.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers, pre_tokenizers, processors

from pdserve.router.text import ascii_bpe
from pdserve.router.text.ascii_bpe import AsciiByteLevelBPE
from pdserve.router.text.tokenizer_fast import fast_encoder
from tests.helpers.tiny_models import _byte_tokenizer


@functools.cache
def smollm2_tokenizer():
    from pdserve.shared.tokenizer import get_tokenizer

    return get_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


TOKENIZERS = {"bytes": functools.cache(_byte_tokenizer), "smollm2": smollm2_tokenizer}
ascii_texts = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(max_codepoint=127), max_size=12),
        st.sampled_from(
            ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "'s", "'t", "'re", "'ve", "'m", "'ll"]
            + ["'d", "'S", "don't", " 12345", "7", "  \n\t", "\r\n", "\x0b\x0c", "\x1c\x1f", " Hello", "  x"]
        ),
    ),
    max_size=8,
).map("".join)


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=300, deadline=None)
@given(text=ascii_texts, add_special=st.booleans())
def test_ascii_text_gets_the_backend_s_ids(name, text, add_special):
    tok = TOKENIZERS[name]()
    bpe = AsciiByteLevelBPE.of(tok.backend_tokenizer, add_special)
    assert bpe is not None
    expected = tok.backend_tokenizer.encode(text, add_special_tokens=add_special).ids
    assert bpe.encode(text) == expected == tok.encode(text, add_special_tokens=add_special)
    assert fast_encoder(tok, add_special)(text) == expected


def test_every_ascii_character_in_every_position():
    tok = smollm2_tokenizer()
    bpe = AsciiByteLevelBPE.of(tok.backend_tokenizer)
    for c in map(chr, range(128)):
        for text in (c, f"a{c}b", f" {c}{c} 1", f"{c} \n", f"x{c}'s", f"{c}{c}{c}"):
            assert bpe.encode(text) == tok.backend_tokenizer.encode(text).ids, repr(text)


def test_template_special_tokens_around_the_text():
    tok = _byte_tokenizer()
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)]
    )
    for add_special in (True, False):
        bpe = AsciiByteLevelBPE.of(backend, add_special)
        for text in ("", "hi there", "a <|im_end|> b"):
            assert bpe.encode(text) == backend.encode(text, add_special_tokens=add_special).ids
    backend.post_processor = processors.Sequence(
        [processors.ByteLevel(), processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])]
    )  # fmt: skip
    assert AsciiByteLevelBPE.of(backend).encode("x y") == backend.encode("x y").ids


def test_added_tokens_in_the_backend_s_two_passes():
    """Tokens not normalized are split out first, the normalized ones from what is left."""
    tok = _byte_tokenizer()
    backend = tok.backend_tokenizer
    backend.add_tokens(
        [
            AddedToken("ab", normalized=True),
            AddedToken("bc", normalized=False),
            AddedToken("abcd", normalized=True),
        ]
    )
    bpe = AsciiByteLevelBPE.of(backend)
    for text in ("abc", "xabcbc", "abcd", "ab cd abcd bcd", "<|im_end|>abc"):
        assert bpe.encode(text) == backend.encode(text).ids, text


def test_new_added_tokens_make_the_encoder_out_of_date():
    tok = _byte_tokenizer()
    encode = fast_encoder(tok)
    bpe = AsciiByteLevelBPE.of(tok.backend_tokenizer)
    assert bpe.matches(tok.backend_tokenizer)
    tok.backend_tokenizer.add_tokens(["hello"])
    assert not bpe.matches(tok.backend_tokenizer)
    assert encode("say hello") == tok.encode("say hello") == tok.backend_tokenizer.encode("say hello").ids


def test_the_piece_cache_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(ascii_bpe, "CACHE_SIZE", 3)
    tok = smollm2_tokenizer()
    bpe = AsciiByteLevelBPE.of(tok.backend_tokenizer)
    text = "one two three four five six seven"
    assert bpe.encode(text) == bpe.encode(text) == tok.backend_tokenizer.encode(text).ids
    assert len(bpe._cache) <= 3


def test_what_is_not_supported_gives_none():
    def changed(change):
        tok = _byte_tokenizer()
        change(tok.backend_tokenizer)
        return AsciiByteLevelBPE.of(tok.backend_tokenizer)

    assert changed(lambda b: None) is not None
    assert changed(lambda b: setattr(b, "normalizer", normalizers.Lowercase())) is None
    assert (
        changed(lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)))
        is None
    )
    assert changed(lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.Whitespace())) is None
    assert (
        changed(lambda b: setattr(b, "post_processor", processors.BertProcessing(("a", 97), ("b", 98))))
        is None
    )
    assert changed(lambda b: b.add_tokens([AddedToken("x y", lstrip=True)])) is None
    split_then_bytes = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(r"\d", "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert changed(lambda b: setattr(b, "pre_tokenizer", split_then_bytes)) is None
