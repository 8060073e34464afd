"""The Hugging Face tokenizer of a model path (local directory, SmolLM2's packaged GGUF, or hub id)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pdserve.shared.models.resolver import resolve_model


def get_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Resolves `path` like the model (ModelNotFoundError when nothing is found) and loads its tokenizer."""
    local_dir = resolve_model(path).local_dir
    return AutoTokenizer.from_pretrained(str(local_dir), trust_remote_code=trust_remote_code)
