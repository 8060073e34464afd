"""SGLang's own `bench_serving.py`, taken from the sglang wheel on the package registry, run as users
run it (never a copy kept in this repository).

    script = bench_serving_script()                     # downloaded once, then cached
    results = run_bench_serving(script, [["--backend", "sglang", ...], ...], tmp_path)

The wheel is fetched with `pip download --no-deps` (only the script is used; it needs aiohttp,
numpy, requests, tqdm and transformers, which the test extra installs) and the script is cached
under `$PDSERVE_CACHE_DIR` (default `~/.cache/pdserve`). Several runs share one Python process
(runpy, as `python bench_serving.py ...` each time): the script's imports load once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SGLANG_VERSION = "0.5.3"

# each argv runs as `python bench_serving.py <argv>`; an exception ends the process with status 1
_DRIVER = """
import json, runpy, sys
script, runs = sys.argv[1], json.loads(sys.argv[2])
for argv in runs:
    print("=== bench_serving", " ".join(argv), flush=True)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
"""


def bench_serving_script() -> Path:
    cache = Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")
    path = cache / f"sglang-{SGLANG_VERSION}" / "bench_serving.py"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "-d",
                tmp,
                f"sglang=={SGLANG_VERSION}",
            ],
            check=True,
            timeout=600,
        )
        wheel = next(Path(tmp).glob("sglang-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            source = zf.read("sglang/bench_serving.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_bytes(source)
    partial.replace(path)
    return path


def run_bench_serving(script: Path, runs: list[list[str]], workdir: Path, timeout_s: float = 600) -> str:
    """Runs each argv in turn in one process (in `workdir`); returns what it printed. Raises
    AssertionError with the output when the process fails (a crash of the script included)."""
    # offline: the script loads `--model` with transformers (for a chat template check), which
    # would retry the hub for minutes on a machine without one
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(script), json.dumps(runs)],
        check=False,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-6000:]
    return printed
