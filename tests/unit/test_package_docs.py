"""Every package of the product says in its docstring what it owns and what it may import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("router", "prefill", "decode", "kvtransfer", "kernels", "shared", "bench")


def test_every_package_docstring_names_what_it_may_import():
    missing = []
    for top in PRODUCT_DIRS:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            if "May import:" not in doc:
                missing.append(str(init.relative_to(ROOT)))
    assert missing == []
