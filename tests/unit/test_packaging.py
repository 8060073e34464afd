"""pyproject.toml lists every package of the seven product directories, so a non-editable install
(`pip install .`, as compose/Dockerfile does) ships every module the editable checkout imports."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("router", "prefill", "decode", "kvtransfer", "kernels", "shared", "bench")


def test_every_package_directory_is_listed_for_setuptools():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "pdserve." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in PRODUCT_DIRS
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert sorted(found - listed) == [], "add these to [tool.setuptools] packages"
    assert sorted(listed - found) == [], "these listed packages have no __init__.py"
