"""Control messages on the tensor-parallel step channel (shared/engine/tp_steps.py), over real ZMQ
sockets on loopback, and how a tensor update's entries are counted per rank
(shared/engine/tp_tensor_updates.py):
- `send_control_each` gives each follower its own message (a tensor update's entry r for rank r,
  bytes or base64 text as the client sent it), `send_control` the same to all, in sending order;
- an update needs exactly one entry per rank (SGLang indexes the list by rank).
"""

from __future__ import annotations

import pytest
import torch
import zmq

from pdserve.shared.engine.tp_steps import ReadWeights, ReloadWeights, StepReceiver, StepSender, UpdateTensors
from pdserve.shared.engine.tp_tensor_updates import rank_entries
from pdserve.shared.engine.weight_swap import WeightsUpdateError


def _next(receiver: StepReceiver, timeout_s: float = 5.0):
    # a control message needs no pool, backend or device: they only rebuild a forward pass
    return receiver.receive(None, None, torch.device("cpu"), timeout_s)  # type: ignore[arg-type]


def test_each_follower_gets_its_own_entry_and_shared_controls_in_order():
    ctx = zmq.Context()
    sender = StepSender(ctx, num_followers=2)
    receivers = [StepReceiver(ctx, address) for address in sender.addresses]
    try:
        sender.send_control_each([UpdateTensors(b"\x00rank1", None), UpdateTensors("cmFuazI=", "direct")])
        sender.send_control(ReadWeights("model.norm.weight", 7))
        sender.send_control(ReloadWeights("/ckpt", "auto"))
        got = [[_next(r) for _ in range(3)] for r in receivers]
        assert got[0][0] == UpdateTensors(b"\x00rank1", None)
        assert got[1][0] == UpdateTensors("cmFuazI=", "direct")
        for messages in got:
            assert messages[1:] == [ReadWeights("model.norm.weight", 7), ReloadWeights("/ckpt", "auto")]
        with pytest.raises(ValueError):  # one message per follower, no more, no fewer
            sender.send_control_each([UpdateTensors(b"x", None)])
        assert [_next(r, 0.2) for r in receivers] == [None, None]  # nothing else was sent
    finally:
        for receiver in receivers:
            receiver.close()
        sender.close()
        ctx.term()


def test_an_update_needs_one_entry_per_rank():
    assert rank_entries(["a", "b"], 2) == ["a", "b"]
    assert rank_entries("a", 1) == ["a"]  # the single-entry form of one rank
    for entries, ranks in ((["a"], 2), (["a", "b"], 1), (["a", "b", "c"], 2)):
        with pytest.raises(WeightsUpdateError, match="one entry per tensor-parallel rank"):
            rank_entries(entries, ranks)
