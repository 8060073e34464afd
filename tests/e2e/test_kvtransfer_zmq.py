"""The zmq KV backend between two real processes (tests/helpers/kv_transfer_peer.py).

Bit-exact transfers (every bit pattern, NaNs included) for float32, float16 and bfloat16: several
requests at once, several chunks each, odd page counts, a partial last page (pages move whole, so
its unfilled tail arrives too), an empty last send, a decode reserve that must stay untouched, and
messages cut small (slab_bytes) so each chunk is several messages. Then the failure paths, each
timed: SIGKILL of the sender mid-transfer (receiver Failed within 5 s, through the dropped
connection), SIGSTOP of the sender (receiver Failed by heartbeat silence), receiver abort and sender
abort (the other side Failed within a second), transfer timeout. Afterwards neither manager holds
any transfer state.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers.kv_peer_process import PeerProcess

pytestmark = pytest.mark.slow

SHAPE = [3, 96, 4, 2, 8]  # layers, pages, page_size, heads, head_dim
SLAB_BYTES = 4096  # 8 to 32 page-layers per message depending on dtype
SENDER_SEED, RECEIVER_SEED = 11, 22


def open_pair(
    sender: PeerProcess, receiver: PeerProcess, name: str, dtype: str = "bfloat16", **receiver_config
):
    """Opens manager `name` in both peers; returns (sender endpoint, receiver endpoint)."""
    common = {"name": name, "backend": "zmq", "device": "cpu", "dtype": dtype, "shape": SHAPE}
    src = sender.call("open", seed=SENDER_SEED, options={"slab_bytes": SLAB_BYTES}, **common)["endpoint"]
    dst = receiver.call(
        "open", seed=RECEIVER_SEED, options={"slab_bytes": SLAB_BYTES}, **{**common, **receiver_config}
    )
    return src, dst["endpoint"]


def transfer(rid: str, src: str, dst: str, chunks: list[list[int]], dst_pages: list[int], **extra):
    """(sender spec, receiver spec) of one request."""
    src_pages = [p for chunk in chunks for p in chunk]
    send = {"rid": rid, "dest": dst, "chunks": chunks, "first_output": {"token": len(rid), "rid": rid}}
    recv = {
        "rid": rid,
        "src": src,
        "pages": dst_pages,
        "expect": {"seed": SENDER_SEED, "src_pages": src_pages},
    }
    send.update({k: v for k, v in extra.items() if k in ("hold_before_chunk", "abort_before_chunk")})
    recv.update({k: v for k, v in extra.items() if k == "abort_when"})
    return send, recv


def run_both(sender: PeerProcess, receiver: PeerProcess, name: str, pairs, wait_s: float = 20.0):
    sender.request("send", manager=name, transfers=[s for s, _ in pairs], wait_s=wait_s)
    receiver.request("recv", manager=name, transfers=[r for _, r in pairs], wait_s=wait_s)
    return sender.reply(wait_s + 10)["results"], receiver.reply(wait_s + 10)


def assert_no_state(*peers_and_names) -> None:
    for peer, name in peers_and_names:
        stats = peer.call("stats", manager=name)["stats"]
        assert stats == {"senders": 0, "receivers": 0, "early": 0, "sending": 0, "peer_refs": 0}, (
            name,
            stats,
        )


@pytest.fixture(scope="module")
def peers():
    sender, receiver = PeerProcess(), PeerProcess()
    yield sender, receiver
    sender.close()
    receiver.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bit_exact_several_requests_chunks_and_dtypes(peers, dtype):
    sender, receiver = peers
    src, dst = open_pair(sender, receiver, dtype, dtype)
    pairs = [
        # 7 pages (odd) in 2 chunks into 9 pages: the last 2 are the decode reserve
        transfer("odd", src, dst, [[5, 40, 7], [8, 90, 61, 2]], [10, 11, 12, 13, 14, 15, 16, 17, 18]),
        # one page, then an empty last send that only carries first_output
        transfer("one", src, dst, [[33], []], [80]),
        # 21 pages in 3 chunks, out of order, each chunk several messages
        transfer(
            "many",
            src,
            dst,
            [[70, 71, 3, 4, 1], [60, 59, 58, 57, 56], list(range(20, 31))],
            list(range(30, 51)),
        ),
    ]
    sent, received = run_both(sender, receiver, dtype, pairs)
    for send, recv in pairs:
        rid = send["rid"]
        assert sent[rid]["state"] == "Success", sent[rid]
        got = received["results"][rid]
        assert (got["state"], got["reason"], got["mismatched_cells"]) == ("Success", None, 0)
        assert got["first_output"] == {"token": len(rid), "rid": rid}
    assert received["foreign_writes"] == 0
    assert_no_state((sender, dtype), (receiver, dtype))


def test_ready_before_the_sender_exists(peers):
    sender, receiver = peers
    src, dst = open_pair(sender, receiver, "early")
    send, recv = transfer("early", src, dst, [[1, 2, 3]], [4, 5, 6])
    receiver.request("recv", manager="early", transfers=[recv], wait_s=20)
    receiver.wait_state("early", "Bootstrapping")
    time.sleep(0.3)  # the Ready waits at the sender's manager, with no sender yet
    sender.request("send", manager="early", transfers=[send], wait_s=20)
    assert sender.reply()["results"]["early"]["state"] == "Success"
    got = receiver.reply()["results"]["early"]
    assert (got["state"], got["mismatched_cells"]) == ("Success", 0)
    assert_no_state((sender, "early"), (receiver, "early"))


def test_receiver_abort_fails_the_sender_quickly(peers):
    sender, receiver = peers
    src, dst = open_pair(sender, receiver, "rabort")
    pair = transfer(
        "ra", src, dst, [[1, 2], [3, 4]], [5, 6, 7, 8], hold_before_chunk=1, abort_when="Transferring"
    )
    sent, received = run_both(sender, receiver, "rabort", [pair])
    got = received["results"]["ra"]
    assert (got["state"], got["reason"]) == ("Failed", "test aborts the receiver")
    assert (sent["ra"]["state"], sent["ra"]["reason"]) == (
        "Failed",
        "receiver aborted: test aborts the receiver",
    )
    assert sent["ra"]["t"] - got["t_abort"] < 1.0
    assert_no_state((sender, "rabort"), (receiver, "rabort"))


def test_sender_abort_fails_the_receiver_quickly(peers):
    sender, receiver = peers
    src, dst = open_pair(sender, receiver, "sabort")
    pair = transfer("sa", src, dst, [[1, 2], [3, 4]], [5, 6, 7, 8], abort_before_chunk=1)
    sent, received = run_both(sender, receiver, "sabort", [pair])
    assert (sent["sa"]["state"], sent["sa"]["reason"]) == ("Failed", "test aborts the sender")
    got = received["results"]["sa"]
    assert (got["state"], got["reason"]) == ("Failed", "sender aborted: test aborts the sender")
    assert got["t"] - sent["sa"]["t"] < 1.0
    assert received["foreign_writes"] == 0
    assert_no_state((sender, "sabort"), (receiver, "sabort"))


def test_transfer_timeout_fails_both(peers):
    sender, receiver = peers
    src, dst = open_pair(sender, receiver, "slow", transfer_timeout_s=1.0)
    pair = transfer("slow", src, dst, [[1], [2]], [3, 4], hold_before_chunk=1)
    start = time.time()
    sent, received = run_both(sender, receiver, "slow", [pair])
    got = received["results"]["slow"]
    assert (got["state"], got["reason"]) == (
        "Failed",
        "transfer did not finish within 1 s (transfer_timeout_s)",
    )
    assert 1.0 <= got["t"] - start < 2.0
    reason = "receiver aborted: transfer did not finish within 1 s (transfer_timeout_s)"
    assert (sent["slow"]["state"], sent["slow"]["reason"]) == ("Failed", reason)
    assert sent["slow"]["t"] - got["t"] < 1.0
    assert_no_state((sender, "slow"), (receiver, "slow"))


def _held_transfer(receiver: PeerProcess, name: str, rid: str, **receiver_config):
    """A fresh sender process that sends the first chunk of `rid` and then holds."""
    doomed = PeerProcess()
    src, dst = open_pair(doomed, receiver, name, **receiver_config)
    send, recv = transfer(
        rid, src, dst, [[1, 2, 3], [4, 5, 6]], [10, 11, 12, 13, 14, 15], hold_before_chunk=1
    )
    receiver.request("recv", manager=name, transfers=[recv], wait_s=20)
    doomed.request("send", manager=name, transfers=[send], wait_s=60)
    receiver.wait_state(rid, "Transferring")
    return doomed, src


def test_sigkill_of_the_sender_fails_the_receiver_within_5_s(peers):
    _, receiver = peers
    doomed, src = _held_transfer(receiver, "kill", "k")
    doomed.kill(signal.SIGKILL)
    killed_at = time.time()
    got = receiver.reply()["results"]["k"]
    doomed.close()
    assert (got["state"], got["reason"]) == ("Failed", f"connection to KV peer {src} lost")
    assert got["t"] - killed_at < 5.0
    assert_no_state((receiver, "kill"))


def test_stopped_sender_fails_the_receiver_by_heartbeat(peers):
    _, receiver = peers
    config = {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 1.5}
    doomed, src = _held_transfer(receiver, "stop", "s", **config)
    doomed.kill(signal.SIGSTOP)  # alive, connected, silent
    stopped_at = time.time()
    got = receiver.reply()["results"]["s"]
    doomed.kill(signal.SIGKILL)
    doomed.close()
    assert got["state"] == "Failed"
    assert got["reason"].startswith(f"KV peer {src} silent for 1.")
    assert got["reason"].endswith("s (heartbeat_timeout_s=1.5)")
    assert 1.0 < got["t"] - stopped_at < 2.5
    assert_no_state((receiver, "stop"))
