"""`ruff check` and `ruff format --check` are clean: the CUDA-only paths run nowhere in CI, so a
name error there (a local `import torch._dynamo` shadowing `torch`, say) is caught by lint or not
at all."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [["check", "--output-format", "concise"], ["format", "--check"]])
def test_ruff_is_clean(args: list[str]):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([ruff, *args, "."], check=False, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
