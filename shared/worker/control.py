"""A worker's answers to SGLang's control routes that touch no request: weight version, profiler,
garbage collector, parameter read-out.

    control = WorkerControl(engine, sock.send, worker_id)
    handlers.update(control.handlers())       # message type -> handler(identity, message)
    control.profiler.after_step()             # the loop calls it after each engine step

Messages (shared/protocol/admin.py) and answers:
- UpdateWeightVersion -> AdminReply: the engine's weight_version becomes the new one (no weights
  change; /get_server_info and every output's meta_info show it);
- StartProfile / StopProfile -> AdminReply (shared/worker/profiler.py; the stop's message names
  the trace file);
- ExpertRecord -> AdminReply (shared/worker/expert_record.py; a dump's message names the file);
- FreezeGC -> AdminReply: `gc.freeze()` after a collection, so the objects alive now (the model,
  the pools) are never scanned again; the message says how many objects are frozen;
- GetWeightsByName -> WeightsByName (shared/engine/tensor_weights.py; under tensor parallelism the
  whole parameter's rows, gathered from every rank: tp_weight_reads.py), or why not.
Rules: the loop thread calls every handler; each answers exactly once, at once.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from pdserve.shared.engine.tp_weight_reads import read_weights
from pdserve.shared.protocol import (
    AdminReply,
    ExpertRecord,
    FreezeGC,
    GetWeightsByName,
    Message,
    StartProfile,
    StopProfile,
    UpdateWeightVersion,
    WeightsByName,
)
from pdserve.shared.worker.expert_record import expert_record_answer
from pdserve.shared.worker.profiler import StepProfiler, safe_label


class WorkerControl:
    def __init__(self, engine, send: Callable[[bytes, Message], object], worker_id: str):
        self.engine = engine
        self._send = send
        self.label = safe_label(worker_id or "worker")
        self.profiler = StepProfiler(worker_id or "worker", engine.args.device.startswith("cuda"))

    def handlers(self) -> dict[type[Message], Callable[[bytes, Message], None]]:
        return {
            UpdateWeightVersion: self._on_weight_version,
            StartProfile: self._on_start_profile,
            StopProfile: self._on_stop_profile,
            ExpertRecord: self._on_expert_record,
            FreezeGC: self._on_freeze_gc,
            GetWeightsByName: self._on_get_weights,
        }

    def _reply(self, identity: bytes, query_id: int, success: bool, message: str) -> None:
        self._send(identity, AdminReply(query_id=query_id, success=success, message=message))

    def _on_weight_version(self, identity: bytes, msg: UpdateWeightVersion) -> None:
        if not isinstance(msg.new_version, str) or not msg.new_version:
            self._reply(identity, msg.query_id, False, "new_version must be a non-empty string.")
            return
        self.engine.weight_version = msg.new_version
        self._reply(identity, msg.query_id, True, f"Weight version updated to {msg.new_version}")

    def _on_start_profile(self, identity: bytes, msg: StartProfile) -> None:
        self._reply(identity, msg.query_id, *self.profiler.start(msg))

    def _on_stop_profile(self, identity: bytes, msg: StopProfile) -> None:
        self._reply(identity, msg.query_id, *self.profiler.stop())

    def _on_expert_record(self, identity: bytes, msg: Message) -> None:
        assert isinstance(msg, ExpertRecord)
        self._reply(identity, msg.query_id, *expert_record_answer(self.engine, msg, self.label))

    def _on_freeze_gc(self, identity: bytes, msg: FreezeGC) -> None:
        gc.collect()  # garbage now would otherwise be frozen with the rest
        gc.freeze()
        self._reply(identity, msg.query_id, True, str(gc.get_freeze_count()))

    def _on_get_weights(self, identity: bytes, msg: GetWeightsByName) -> None:
        try:
            parameter = read_weights(self.engine.runner, msg.name, msg.truncate_size)
        except KeyError:
            reply = WeightsByName(
                query_id=msg.query_id, success=False, message=f"The served model has no parameter {msg.name}."
            )
        else:
            reply = WeightsByName(query_id=msg.query_id, parameter=parameter)
        self._send(identity, reply)
