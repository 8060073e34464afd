"""No product file passes 400 lines: a file that grows past that is split by concept (STYLE.md 1),
before it becomes the one that everything is added to."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("router", "prefill", "decode", "kvtransfer", "kernels", "shared", "bench")
MAX_LINES = 400


def test_every_product_file_has_at_most_400_lines():
    too_long = []
    for top in PRODUCT_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            num_lines = len(path.read_text().splitlines())
            if num_lines > MAX_LINES:
                too_long.append(f"{path.relative_to(ROOT)} ({num_lines} lines)")
    assert not too_long, f"over {MAX_LINES} lines, split by concept: " + ", ".join(too_long)
