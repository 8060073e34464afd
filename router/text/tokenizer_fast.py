"""The Rust `tokenizers` backend called directly, where that gives exactly what transformers gives.

    decode = fast_decoder(tokenizer)     # decode(ids, skip_special_tokens) == decode_ids(...)
                                         # (cheap to make: one per request is fine)
    encode = fast_encoder(tokenizer)     # encode(text) == tokenizer.encode(text)
    encode = fast_encoder(tokenizer, add_special_tokens=False)
                                         # (not cheap to make: one per tokenizer, RouterState.encoder)

Why: the router encodes every text prompt and decodes a few ids per streamed token. transformers'
wrappers cost more than the Rust work for those small calls: `decode` walks the id list in Python
(`to_py_obj`), and `encode` resets truncation and padding, builds a BatchEncoding and runs the
batch through `encode_batch`, which also computes offsets the router never reads.

Rules:
- the direct path is taken only for tokenizers whose class does what transformers'
  TokenizersBackend does (the methods involved are not overridden); any other tokenizer, or a
  transformers without that class, gets plain wrappers of the public methods;
- `fast_encoder` checks at each call that the backend would encode as `tokenizer.encode` does now:
  no truncation or padding configured on it, special-token splitting as the tokenizer says;
  otherwise that call goes through `tokenizer.encode`;
- ASCII text, for byte-level BPE tokenizers (GPT-2's scheme), skips the backend's pre-tokenizer,
  most of the cost of an encode (router/text/ascii_bpe.py: same ids); other text goes to the backend;
- decoding never cleans up tokenization spaces (router/text/detokenizer.py says why).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pdserve.router.text.ascii_bpe import AsciiByteLevelBPE

# (ids, skip_special_tokens) -> text
Decoder = Callable[[list[int], bool], str]
# text -> ids
Encoder = Callable[[str], list[int]]


def fast_decoder(tokenizer: Any) -> Decoder:
    """`tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)`."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not _is_plain_backend(type(tokenizer), "_decode", "decode"):
        return lambda ids, skip: tokenizer.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )
    decode = backend.decode
    return lambda ids, skip: decode(ids, skip_special_tokens=skip)


def fast_encoder(tokenizer: Any, add_special_tokens: bool = True) -> Encoder:
    """`tokenizer.encode(text, add_special_tokens=add_special_tokens)`, for one text."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is None
        or not hasattr(backend, "encode_batch_fast")
        or not _is_plain_backend(type(tokenizer), "_encode_plus", "encode")
    ):
        return lambda text: tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ascii_bpe = AsciiByteLevelBPE.of(backend, add_special_tokens)

    def encode(text: str) -> list[int]:
        if (
            backend.truncation is not None
            or backend.padding is not None
            or backend.encode_special_tokens != bool(tokenizer.split_special_tokens)
        ):  # transformers resets these per call: let it
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if (
            ascii_bpe is not None
            and text.isascii()
            and not backend.encode_special_tokens
            and ascii_bpe.matches(backend)
        ):
            return ascii_bpe.encode(text)
        return backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    return encode


@functools.cache  # a pure function of classes: tokenizers are made per request from it
def _is_plain_backend(cls: type, backend_method: str, base_method: str) -> bool:
    """cls is a transformers TokenizersBackend that overrides neither `backend_method` (the
    backend class's implementation) nor `base_method` (PreTrainedTokenizerBase's public one)."""
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep the public methods
        return False
    return (
        issubclass(cls, TokenizersBackend)
        and getattr(cls, backend_method) is getattr(TokenizersBackend, backend_method)
        and getattr(cls, base_method) is getattr(PreTrainedTokenizerBase, base_method)
    )
