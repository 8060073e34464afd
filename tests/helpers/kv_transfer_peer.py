"""A KV transfer peer process for end-to-end and GPU tests: `python -m tests.helpers.kv_transfer_peer`.

It reads one JSON command per line on stdin and answers with JSON lines on stdout: `{"ready": pid}`
at start, `{"event": "state", ...}` lines as its transfers change state (with wall-clock `t`, so
the test can time a failure against the moment it killed the other process), and one
`{"reply": op, ...}` line per command. Commands:

- open: {name, backend, device, dtype, shape: [layers, pages, page_size, heads, head_dim], seed,
  heartbeat_timeout_s?, transfer_timeout_s?, options?} -> {endpoint}. The pool is filled with
  random bytes from `seed` (every bit pattern, NaNs included), so a receiver can rebuild the
  sender's pool and compare bit for bit.
- send: {manager, transfers: [{rid, dest, chunks: [[page, ...], ...], first_output,
  hold_before_chunk?, abort_before_chunk?}], wait_s} -> {results: {rid: {state, reason, t}}}.
  Chunks go out round robin across the transfers once each is WaitingForInput; a held transfer
  stops before that chunk and waits (for its peer to fail it, or to be killed).
- recv: {manager, transfers: [{rid, src, pages, expect: {seed, src_pages}, abort_when?}], wait_s}
  -> {results: {rid: {state, reason, t, t_abort, first_output, mismatched_cells}}, foreign_writes};
  mismatched_cells counts (layer, K/V, page) blocks that differ from the sender's pool (None unless
  Success); foreign_writes counts blocks changed where no transfer of the command may write.
- stats: {manager} -> the manager's stats(); exit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from pdserve.kvtransfer import KVManager, KVPoll, KVTransferConfig, make_kv_manager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

POLL_S = 0.0005


def fill_random(pool: PagedKVPool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in pool.k_buffers + pool.v_buffers:
        raw = torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=gen)
        t.view(-1).view(torch.uint8).copy_(raw.to(t.device))


def random_pool(shape: list[int], dtype: str, device: str, seed: int) -> PagedKVPool:
    pool = PagedKVPool(KVPoolShape(*shape), getattr(torch, dtype), device)
    fill_random(pool, seed)
    return pool


def mismatched_cells(src: PagedKVPool, src_pages: list[int], dst: PagedKVPool, dst_pages: list[int]) -> int:
    bad = 0
    for s, d in zip(src.k_buffers + src.v_buffers, dst.k_buffers + dst.v_buffers, strict=True):
        a = s[src_pages].cpu().view(torch.uint8).flatten(1)
        b = d[dst_pages].cpu().view(torch.uint8).flatten(1)
        bad += int((a != b).any(dim=1).sum())
    return bad


def foreign_writes(pool: PagedKVPool, before: list[torch.Tensor], receivers: dict, specs: dict) -> int:
    """(layer, K/V, page) blocks changed outside the pages a transfer may write: the transferred
    prefix of a successful one (not its reserve), any page of a failed one."""
    allowed: set[int] = set()
    for rid, receiver in receivers.items():
        pages = specs[rid]["pages"]
        success = receiver.poll() == KVPoll.Success
        allowed.update(pages[: len(specs[rid]["expect"]["src_pages"])] if success else pages)
    others = [p for p in range(pool.num_pages) if p not in allowed]
    bad = 0
    for now, then in zip(pool.k_buffers + pool.v_buffers, before, strict=True):
        bad += int(
            (now[others].view(torch.uint8) != then[others].view(torch.uint8)).flatten(1).any(dim=1).sum()
        )
    return bad


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class Peer:
    def __init__(self) -> None:
        self.managers: dict[str, tuple[KVManager, dict[str, Any]]] = {}

    def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pool = random_pool(cmd["shape"], cmd["dtype"], cmd["device"], cmd["seed"])
        config = KVTransferConfig(
            heartbeat_interval_s=cmd.get("heartbeat_interval_s", 1.0),
            heartbeat_timeout_s=cmd.get("heartbeat_timeout_s", 5.0),
            transfer_timeout_s=cmd.get("transfer_timeout_s", 30.0),
        )
        manager = make_kv_manager(cmd["backend"], pool, cmd["name"], config=config, **cmd.get("options", {}))
        self.managers[cmd["name"]] = (manager, cmd)
        return {"endpoint": manager.endpoint}

    def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        manager, _ = self.managers[cmd["manager"]]
        specs = {t["rid"]: t for t in cmd["transfers"]}
        senders = {rid: manager.make_sender(rid, t["dest"]) for rid, t in specs.items()}
        next_chunk = dict.fromkeys(specs, 0)

        def step(rid: str) -> None:
            spec, sender, k = specs[rid], senders[rid], next_chunk[rid]
            if sender.poll() < KVPoll.WaitingForInput or k >= len(spec["chunks"]):
                return
            if spec.get("hold_before_chunk") == k:
                return
            if spec.get("abort_before_chunk") == k:
                sender.abort("test aborts the sender")
                next_chunk[rid] = len(spec["chunks"])
                return
            last = k == len(spec["chunks"]) - 1
            sender.send(
                spec["chunks"][k], is_last=last, first_output=spec.get("first_output") if last else None
            )
            next_chunk[rid] = k + 1

        return self._run(senders, cmd["wait_s"], step, lambda rid: {})

    def recv(self, cmd: dict[str, Any]) -> dict[str, Any]:
        manager, opened = self.managers[cmd["manager"]]
        specs = {t["rid"]: t for t in cmd["transfers"]}
        before = [t.clone() for t in manager.pool.k_buffers + manager.pool.v_buffers]
        receivers = {rid: manager.make_receiver(rid, t["src"]) for rid, t in specs.items()}
        for rid, receiver in receivers.items():
            receiver.init(specs[rid]["pages"])
        aborted_at: dict[str, float] = {}

        def step(rid: str) -> None:
            when = specs[rid].get("abort_when")
            if when and rid not in aborted_at and receivers[rid].poll() >= KVPoll[when]:
                aborted_at[rid] = time.time()
                receivers[rid].abort("test aborts the receiver")

        def extra(rid: str) -> dict[str, Any]:
            receiver, spec = receivers[rid], specs[rid]
            out: dict[str, Any] = {"first_output": receiver.first_output, "t_abort": aborted_at.get(rid)}
            out["mismatched_cells"] = None
            if receiver.poll() == KVPoll.Success:
                expected = random_pool(opened["shape"], opened["dtype"], "cpu", spec["expect"]["seed"])
                src_pages = spec["expect"]["src_pages"]
                out["mismatched_cells"] = mismatched_cells(
                    expected, src_pages, manager.pool, spec["pages"][: len(src_pages)]
                )
            return out

        reply = self._run(receivers, cmd["wait_s"], step, extra)
        reply["foreign_writes"] = foreign_writes(manager.pool, before, receivers, specs)
        return reply

    def _run(self, handles: dict[str, Any], wait_s: float, step, extra) -> dict[str, Any]:
        """Polls every handle until all are final (or wait_s), emitting each state change."""
        seen: dict[str, KVPoll] = {}
        final_at: dict[str, float] = {}
        deadline = time.monotonic() + wait_s
        while len(final_at) < len(handles) and time.monotonic() < deadline:
            for rid, handle in handles.items():
                if rid in final_at:
                    continue
                step(rid)
                state = handle.poll()
                if seen.get(rid) != state:
                    seen[rid] = state
                    emit(event="state", rid=rid, state=state.name, t=time.time())
                if state in (KVPoll.Success, KVPoll.Failed):
                    final_at[rid] = time.time()
            time.sleep(POLL_S)
        return {
            "results": {
                rid: {
                    "state": h.poll().name,
                    "reason": h.failure_reason,
                    "t": final_at.get(rid),
                    **extra(rid),
                }
                for rid, h in handles.items()
            }
        }

    def stats(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self.managers[cmd["manager"]][0].stats()}


def main() -> None:
    peer = Peer()
    emit(ready=os.getpid())
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        emit(reply=cmd["op"], **getattr(peer, cmd["op"])(cmd))
    for manager, _ in peer.managers.values():
        manager.close()


if __name__ == "__main__":
    main()
