"""A directory built once per machine by a slow conversion, safe when many processes ask at once.

Rules:
- A target directory is complete when its marker file names the current conversion version; a
  reader never sees a half-written directory, because the conversion writes into a temporary
  directory next to the target and `os.rename`s it into place (atomic on one filesystem).
- An exclusive `fcntl` lock on `<target>.lock` makes concurrent callers wait for the first one
  instead of converting again; the lock dies with its process, so a crash leaves no stale lock.
- A target from an older version (or without a marker) is replaced.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER = ".pdserve-conversion.json"


def is_complete(target: Path, version: int) -> bool:
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == version
    except ValueError:
        return False


def _make_readable(root: Path) -> None:
    """mkdtemp makes the directory owner-only; a shared cache must be readable by other users."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def convert_once(target: Path, version: int, convert: Callable[[Path], None]) -> Path:
    """Returns `target`, first running `convert(tmp_dir)` and publishing it unless already complete."""
    if is_complete(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(target, version):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert(tmp)
            (tmp / MARKER).write_text(json.dumps({"version": version}))
            _make_readable(tmp)
            if target.exists():  # stale: move it aside first, os.rename cannot replace a non-empty dir
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
                os.rename(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
