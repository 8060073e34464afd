"""The layering in pyproject.toml's [tool.importlinter] holds: import-linter over the pdserve.<dir>
namespace (which the editable install makes with an import hook that static tools cannot follow,
so the test lays the namespace out as a directory of links), and a probe that breaks a contract is
caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_CLI = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # `lint-imports`
DIRS = ("router", "prefill", "decode", "kvtransfer", "kernels", "shared", "bench")


def _namespace(tmp_path: Path, copy: str | None = None) -> Path:
    """tmp_path/ns/pdserve/<dir> for every top-level directory: links, or a copy of `copy`."""
    pkg = tmp_path / "ns" / "pdserve"
    pkg.mkdir(parents=True)
    for name in DIRS:
        if name == copy:
            shutil.copytree(ROOT / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
    return pkg.parent


def _lint(namespace: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CLI, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(namespace), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_contract_is_kept(tmp_path):
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    result = _lint(_namespace(tmp_path), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {contracts} kept, 0 broken." in result.stdout


def test_a_router_module_that_imports_torch_breaks_the_contract(tmp_path):
    namespace = _namespace(tmp_path, copy="router")
    (namespace / "pdserve" / "router" / "probe_torch.py").write_text("import torch\n")
    result = _lint(namespace, tmp_path)
    assert result.returncode != 0
    assert "The router never imports torch BROKEN" in result.stdout
    assert "pdserve.router.probe_torch -> torch" in result.stdout


def test_router_text_that_imports_the_http_layer_breaks_the_router_layers(tmp_path):
    namespace = _namespace(tmp_path, copy="router")
    probe = namespace / "pdserve" / "router" / "text" / "probe_http.py"
    probe.write_text("from pdserve.router.http import sse\n")
    result = _lint(namespace, tmp_path)
    assert result.returncode != 0
    assert (
        "Router layers: openapi > native > openai > http > serving > cluster | text BROKEN" in result.stdout
    )
    assert "pdserve.router.text.probe_http -> pdserve.router.http.sse" in result.stdout


def test_router_cluster_that_imports_aiohttp_breaks_its_contract(tmp_path):
    namespace = _namespace(tmp_path, copy="router")
    (namespace / "pdserve" / "router" / "cluster" / "probe_aiohttp.py").write_text("import aiohttp\n")
    result = _lint(namespace, tmp_path)
    assert result.returncode != 0
    assert "Router cluster and text: no aiohttp, nothing of the router's top level BROKEN" in result.stdout
    assert "pdserve.router.cluster.probe_aiohttp -> aiohttp" in result.stdout
