"""Fixtures shared by unit test modules: `tok`, the tiny models' byte-level tokenizer (one token per
UTF-8 byte, 3 special tokens), one per module."""

from __future__ import annotations

import pytest

from tests.helpers.tiny_models import _byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()
