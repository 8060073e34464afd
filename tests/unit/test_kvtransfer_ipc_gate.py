"""The cuda_ipc write gate (kvtransfer/ipc_gate.py) between this process and a real second process.

- a sender admits a write only for an open slot with its own nonce; a slot reused for another
  transfer refuses the old nonce;
- closing a slot waits for a write in progress in the other process, and after close() returns
  no write of that transfer starts;
- a writer killed while holding a slot's lock does not block the receiver (the kernel drops the
  lock with the process);
- attaching with a wrong token, or to a process that is gone, fails with a reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pdserve.kvtransfer.ipc_gate import GateError, GateTable, GateView

NONCE_A, NONCE_B = b"AAAAAAAA", b"BBBBBBBB"

# A writer process: attaches, then for each command line takes the slot's lock, reports whether
# the write is allowed, holds it `hold_s` (a copy in progress), releases and reports.
WRITER = """
import json, sys, time
from pdserve.kvtransfer.ipc_gate import GateView
locator = json.loads(sys.argv[1])
locator["token"] = bytes.fromhex(locator["token"])
view = GateView.attach(locator, wait_s=5.0)
print(json.dumps({"attached": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    with view.writing(cmd["slot"], bytes.fromhex(cmd["nonce"])) as allowed:
        print(json.dumps({"locked": True, "allowed": allowed, "t": time.time()}), flush=True)
        time.sleep(cmd["hold_s"])
    print(json.dumps({"released": True, "t": time.time()}), flush=True)
"""


class Writer:
    def __init__(self, table: GateTable):
        locator = {**table.locator(), "token": table.token.hex()}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(locator)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.line() == {"attached": True}

    def line(self) -> dict:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def write(self, slot: int, nonce: bytes, hold_s: float = 0.0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"slot": slot, "nonce": nonce.hex(), "hold_s": hold_s}) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def table():
    gate = GateTable(num_slots=8, wait_s=5.0)
    yield gate
    gate.shutdown()


def test_only_an_open_slot_with_its_own_nonce_admits_a_write(table):
    writer = Writer(table)
    try:
        slot = table.open(NONCE_A)
        writer.write(slot, NONCE_A)
        assert writer.line()["allowed"] is True and "released" in writer.line()
        writer.write(slot, NONCE_B)
        assert writer.line()["allowed"] is False and "released" in writer.line()
        table.close(slot)
        writer.write(slot, NONCE_A)
        assert writer.line()["allowed"] is False and "released" in writer.line()
        again = table.open(NONCE_B)
        assert again == slot  # reused for the next transfer: the old nonce stays out
        writer.write(slot, NONCE_A)
        assert writer.line()["allowed"] is False and "released" in writer.line()
        writer.write(slot, NONCE_B)
        assert writer.line()["allowed"] is True and "released" in writer.line()
        writer.write(99, NONCE_B)  # no such slot
        assert writer.line()["allowed"] is False and "released" in writer.line()
        assert table.open_slots() == 1
    finally:
        writer.close()


def test_close_waits_for_the_write_in_progress_then_shuts_it_out(table):
    writer = Writer(table)
    try:
        slot = table.open(NONCE_A)
        writer.write(slot, NONCE_A, hold_s=0.4)
        locked = writer.line()
        assert locked["allowed"] is True
        table.close(slot)
        closed_at = time.time()
        released = writer.line()
        assert closed_at >= released["t"]  # close() returned only once the copy had finished
        assert closed_at - locked["t"] >= 0.35
        writer.write(slot, NONCE_A)
        assert writer.line()["allowed"] is False
    finally:
        writer.close()


def test_a_writer_killed_holding_the_lock_does_not_block_the_receiver(table):
    writer = Writer(table)
    slot = table.open(NONCE_A)
    writer.write(slot, NONCE_A, hold_s=60.0)
    assert writer.line()["allowed"] is True
    writer.close()  # SIGKILL while it holds the lock
    started = time.monotonic()
    table.close(slot)
    assert time.monotonic() - started < 1.0
    assert table.open_slots() == 0


def test_a_slot_held_past_wait_s_is_closed_anyway():
    gate = GateTable(num_slots=2, wait_s=0.3)
    writer = Writer(gate)
    try:
        slot = gate.open(NONCE_A)
        writer.write(slot, NONCE_A, hold_s=5.0)  # a stopped writer, as far as the receiver can tell
        assert writer.line()["allowed"] is True
        started = time.monotonic()
        gate.close(slot)
        assert 0.25 < time.monotonic() - started < 2.0
        assert gate.open_slots() == 0
    finally:
        writer.close()
        gate.shutdown()


def test_full_table_and_bad_attachments(table):
    slots = [table.open(bytes([i]) * 8) for i in range(8)]
    assert sorted(slots) == list(range(8)) and table.open(NONCE_A) is None
    with pytest.raises(GateError, match="token"):
        GateView.attach({**table.locator(), "token": b"x" * 16}, wait_s=1.0)
    with pytest.raises(GateError, match="cannot open"):
        GateView.attach({**table.locator(), "pid": 2**22 + 17}, wait_s=1.0)
    view = GateView.attach(table.locator(), wait_s=1.0)  # this very process works too
    with view.writing(slots[3], bytes([3]) * 8) as allowed:
        assert allowed
    view.close()
