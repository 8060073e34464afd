"""A tensor-parallel follower's check that rank 0 still runs (tp_follower_main.parent_alive_check):
true while the watched process runs, false once it exited, reaped or not (a zombie has exited), and
false at once for a pid that is gone before the check is made."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pdserve.shared.launch.tp_follower_main import parent_alive_check


def test_true_while_the_process_runs_false_once_it_exited_even_unreaped():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = parent_alive_check(proc.pid)
        assert alive()
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive()
        assert proc.poll() is not None  # reaped only now, after the check saw the exit
    finally:
        proc.kill()
        proc.wait()


def test_false_for_a_pid_already_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not parent_alive_check(proc.pid)()
