"""A worker's side of `/start_expert_distribution_record`, `/stop_...` and `/dump_...`.

    answer = expert_record_answer(engine, ExpertRecord(action="dump", dump_id="1712.5"), label)
    # (True, "/tmp/expert_distribution_recorder_1712.5_mixed-127.0.0.1-30001.pt") or (False, why)

Rules (SGLang's): start resets the record and turns recording on; stop turns it off; dump
writes the record (shared/engine/expert_distribution.py says what and where) and resets it. A
dense model, or a worker started without `--expert-distribution-recorder-mode`, answers why not
(the router makes that a 400).
"""

from __future__ import annotations

from pdserve.shared.protocol import ExpertRecord

ACTIONS = ("start", "stop", "dump")


def _why_not(engine) -> str:
    config = engine.model_config
    arch = ", ".join(config.architectures) or config.model_type
    if config.num_experts == 0:
        return (
            f"The served model {engine.args.model_path} ({arch}) has no mixture-of-experts layers: "
            "expert distribution recording needs a MoE model."
        )
    return (
        "Expert distribution recording is off on this worker: start it with "
        "--expert-distribution-recorder-mode stat."
    )


def expert_record_answer(engine, msg: ExpertRecord, label: str) -> tuple[bool, str]:
    recorder = engine.runner.expert_recorder
    if recorder is None:
        return False, _why_not(engine)
    if msg.action == "start":
        recorder.start()
        return True, "Start recording the expert distribution."
    if msg.action == "stop":
        recorder.stop()
        return True, "Stop recording the expert distribution."
    if msg.action == "dump":
        try:
            return True, str(recorder.dump(msg.dump_id, label))
        except OSError as exc:
            return False, f"The expert distribution record could not be written: {exc}"
    return False, f"Unknown expert record action {msg.action!r}; expected one of {list(ACTIONS)}."
