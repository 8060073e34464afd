"""Leaving a served process without the interpreter's teardown.

A worker or router that has stopped serving has already closed what it owns (sockets, threads,
child processes, files); what Python's finalization would still do is tear down torch's and
transformers' modules, about a second on a small CPU for nothing a caller can see. Restarts,
drains and supervisors wait for that exit, so the process flushes its streams and logs and leaves.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_process(status: int) -> NoReturn:
    """Flushes stdout, stderr and the logging handlers, then ends the process with `status`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe has nothing left to flush
            pass
    os._exit(status)
