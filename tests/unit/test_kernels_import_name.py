"""`kernels` from a checkout: the bare name must stay Hugging Face's kernel hub (kernels/__init__.py).

transformers >= 5 imports that package at start-up; a process started with `python -m` from the
repository root has the root on sys.path, where pdserve's kernels/ would shadow it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from transformers import LlamaConfig  # imports the kernel hub when transformers uses it
import kernels, pdserve.kernels
print(kernels.__file__)
print(pdserve.kernels.__file__)
"""


def test_bare_kernels_name_is_not_pdserve_in_a_checkout():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bare, ours = done.stdout.split()
    assert Path(ours) == REPO_ROOT / "kernels" / "__init__.py"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert Path(bare) == Path(ours)  # no hub installed: the name falls back to the checkout's dir
    else:
        assert Path(bare) != Path(ours), "transformers would import pdserve's kernels as the hub"
