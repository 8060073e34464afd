"""The README's test command is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [ln for ln in lines if ln.startswith("(python3 -c 'import torch'")]


def test_readme_has_run_and_test_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[1].endswith("python3 -m pytest -q -n 2 --dist loadgroup")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci
