"""mypy over the pdserve.<dir> namespace finds no more errors in any file than the committed baseline,
tests/unit/type_check_baseline.json ({"router/app.py": 5, ...}, paths from the repository root),
allows: a file's count may shrink, never grow, and a file missing from the baseline has none.

The editable install makes the namespace with an import hook that mypy cannot follow, so the test
lays it out as a directory of links, <tmp>/pdserve/<dir> -> <repo>/<dir>, and checks the seven
packages from there with [tool.mypy] of pyproject.toml. mypy's cache lives in
~/.cache/pdserve/mypy ($XDG_CACHE_HOME/pdserve/mypy where that is set): a first run on a machine
takes about 45 s on two cores (most of it reading torch's and transformers' annotations), a later
one a few seconds.

The baseline, from the repository root:

    python tests/unit/test_type_check.py --update   # lower counts to today's (after fixing errors)
    python tests/unit/test_type_check.py --reset    # write today's counts as they are, higher
                                                    # ones too (a new mypy release): say why
                                                    # in the commit
    python tests/unit/test_type_check.py            # print today's errors and the comparison
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = Path(__file__).with_name("type_check_baseline.json")
DIRS = ("router", "prefill", "decode", "kvtransfer", "kernels", "shared", "bench")
# `path:line: error: message  [code]`, the path relative to the namespace directory
_ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<message>.*)$", re.MULTILINE)

pytestmark = pytest.mark.slow  # about 45 s where the cache is cold


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pdserve" / "mypy"


def _namespace(workdir: Path) -> Path:
    """workdir/pdserve/<dir> -> ROOT/<dir> for every top-level directory; returns workdir."""
    pkg = workdir / "pdserve"
    pkg.mkdir(parents=True)
    for name in DIRS:
        (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
    return workdir


def run_mypy(workdir: Path) -> dict[str, list[str]]:
    """mypy's errors by file (repository-relative path for pdserve's own files), each error as
    mypy printed it."""
    namespace = _namespace(workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYPY")}
    env["MYPYPATH"] = str(namespace)
    packages = [arg for name in DIRS for arg in ("-p", f"pdserve.{name}")]
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--python-executable",
        sys.executable,
        "--cache-dir",
        str(_cache_dir()),
        "--no-pretty",
        "--no-color-output",
        "--show-error-codes",
        "--no-error-summary",
        *packages,
    ]
    done = subprocess.run(
        cmd, cwd=namespace, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    errors: dict[str, list[str]] = defaultdict(list)
    for m in _ERROR.finditer(done.stdout):
        path = m["path"]
        path = path.removeprefix("pdserve/")
        errors[path].append(f"{path}:{m['line']}: {m['message']}")
    # 0: clean; 1: errors found. Anything else (2: a crash, a bad option or config) is no result.
    if done.returncode not in (0, 1) or (done.returncode == 1 and not errors):
        raise RuntimeError(f"mypy exited {done.returncode}:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}")
    return dict(errors)


def compare(errors: dict[str, list[str]], baseline: dict[str, int]) -> tuple[list[str], list[str]]:
    """(files over their baseline, each with all its errors; files under their baseline)."""
    worse, better = [], []
    for path in sorted(set(errors) | set(baseline)):
        found, allowed = len(errors.get(path, [])), baseline.get(path, 0)
        if found > allowed:
            lines = "\n".join(f"    {e}" for e in errors[path])
            worse.append(f"{path}: {_errors(found)}, the baseline allows {allowed}:\n{lines}")
        elif found < allowed:
            better.append(f"{path}: {_errors(found)}, the baseline allows {allowed}")
    return worse, better


def _errors(n: int) -> str:
    return f"{n} error" if n == 1 else f"{n} errors"


def _load_baseline() -> dict[str, int]:
    return json.loads(BASELINE.read_text()) if BASELINE.exists() else {}


def _write_baseline(counts: dict[str, int]) -> None:
    counts = {path: n for path, n in sorted(counts.items()) if n > 0}
    BASELINE.write_text(json.dumps(counts, indent=1) + "\n")


def test_no_file_has_more_type_errors_than_its_baseline(tmp_path):
    errors = run_mypy(tmp_path)
    worse, better = compare(errors, _load_baseline())
    if better:
        warnings.warn(
            "fewer mypy errors than the baseline allows; lower it with "
            "`python tests/unit/test_type_check.py --update`:\n" + "\n".join(better),
            stacklevel=1,
        )
    assert not worse, (
        "mypy finds more errors than tests/unit/type_check_baseline.json allows (fix them, or for "
        "a mypy release that finds new ones, `python tests/unit/test_type_check.py --reset`):\n"
        + "\n".join(worse)
    )


def test_the_baseline_names_only_files_of_the_repository():
    baseline = _load_baseline()
    assert all(isinstance(n, int) and n > 0 for n in baseline.values())
    missing = [path for path in baseline if not (ROOT / path).is_file()]
    assert not missing, f"the baseline names files that are gone (run --update): {missing}"


def test_compare_flags_a_new_error_and_tolerates_a_fixed_one():
    errors = {
        "router/a.py": ["router/a.py:1: x", "router/a.py:2: y"],
        "shared/new.py": ["shared/new.py:3: z"],
    }
    worse, better = compare(errors, {"router/a.py": 1, "decode/b.py": 2})
    assert [w.splitlines()[0] for w in worse] == [
        "router/a.py: 2 errors, the baseline allows 1:",
        "shared/new.py: 1 error, the baseline allows 0:",
    ]
    assert "    router/a.py:2: y" in worse[0]
    assert better == ["decode/b.py: 0 errors, the baseline allows 2"]


def _main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        errors = run_mypy(Path(tmp))
    counts = {path: len(lines) for path, lines in errors.items()}
    baseline = _load_baseline()
    if "--reset" in argv:
        _write_baseline(counts)
    elif "--update" in argv:
        _write_baseline({path: min(n, counts.get(path, 0)) for path, n in baseline.items()})
    else:
        for lines in errors.values():
            print("\n".join(lines))
    worse, better = compare(errors, _load_baseline())
    print("\n".join([*worse, *better]))
    print(f"{sum(counts.values())} errors in {len(counts)} files; baseline {sum(_load_baseline().values())}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
