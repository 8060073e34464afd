"""The tests' fork server (tests/helpers/zygote.py): a forked `python -m` child gets its argv,
environment, cwd and stdio like a Popen'd one, and its exit status comes back as Popen reports it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers import zygote

PROBE = [sys.executable, "-m", "tests.helpers.zygote_probe"]


def test_a_forked_child_sees_its_argv_env_cwd_and_pipes_and_exits_with_its_status(tmp_path):
    err_path = tmp_path / "stderr.log"
    with open(err_path, "w") as err:
        proc = zygote.popen(
            [*PROBE, "--exit", "3"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={"ZYGOTE_PROBE": "seen", "PATH": "/usr/bin"},
            cwd=tmp_path,
        )
    assert isinstance(proc, zygote.ZygoteProcess)  # forked, not the Popen fallback
    seen = json.loads(proc.stdout.readline())
    assert seen["argv"] == ["--exit", "3"]
    assert seen["cwd"] == str(tmp_path)
    assert seen["probe_env"] == "seen"
    assert seen["torch_preloaded"]
    assert seen["main_file"].endswith("zygote_probe.py")
    proc.stdin.write("hello\nworld\n")
    proc.stdin.close()
    assert proc.stdout.read().split() == ["HELLO", "WORLD"]
    assert proc.wait(timeout=30) == 3
    assert proc.poll() == 3
    assert err_path.read_text() == "to stderr\n"


def test_wait_times_out_like_popen_and_a_signal_death_is_minus_the_signal():
    proc = zygote.popen([*PROBE, "--sleep"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert json.loads(proc.stdout.readline())["argv"] == ["--sleep"]
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.send_signal(signal.SIGTERM)  # after the exit: nothing to signal, no error


def test_commands_it_cannot_fork_fall_back_to_popen():
    proc = zygote.popen([sys.executable, "-c", "print('cold')"], stdout=subprocess.PIPE, text=True)
    assert isinstance(proc, subprocess.Popen)
    assert proc.communicate(timeout=60)[0] == "cold\n"


def test_run_captures_both_streams_and_the_status():
    res = zygote.run([*PROBE, "--exit", "5"], timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 5
    assert json.loads(res.stdout.splitlines()[0])["argv"] == ["--exit", "5"]
    assert res.stderr == "to stderr\n"
