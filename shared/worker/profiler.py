"""torch profiler traces of a worker's loop, for `/start_profile` and `/stop_profile`.

    profiler = StepProfiler(label="mixed-127.0.0.1-30001", cuda=False)
    ok, message = profiler.start(StartProfile(profile_id="1712.5", output_dir="/tmp/traces"))
    ...                                   # the loop runs steps; after each: profiler.after_step()
    ok, message = profiler.stop()         # writes <output_dir>/<profile_id>-<label>.trace.json.gz

Rules (SGLang's, per worker instead of per TP rank):
- one trace at a time: a second start, or a stop with none running, is refused with SGLang's words;
- `output_dir` None means $SGLANG_TORCH_PROFILER_DIR, else /tmp; it is created at the start; the file is a Chrome trace (gzip JSON), as SGLang writes, named by the profile id the
  router gave every worker and this worker's label;
- `activities` are "CPU" and "GPU" (default both); "GPU" records CUDA kernels where the worker runs
  on CUDA and nothing more on a CPU worker; SGLang's other activities ("MEM", "RPD",
  "CUDA_PROFILER") are refused by name;
- `num_steps`: the trace stops by itself after that many engine steps (steps that ran a batch);
- `with_stack` defaults to True and `record_shapes` to False, as SGLang's do;
- the profiler runs on the loop thread, which is the thread that runs the model.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from pdserve.shared.protocol import StartProfile

logger = logging.getLogger(__name__)

ACTIVITIES = ("CPU", "GPU")
DEFAULT_DIR_ENV = "SGLANG_TORCH_PROFILER_DIR"


def safe_label(text: str) -> str:
    """A worker id made fit for a file name ("mixed@127.0.0.1:30001" -> "mixed-127.0.0.1-30001")."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "worker"


class StepProfiler:
    def __init__(self, label: str, cuda: bool):
        self.label = safe_label(label)
        self.cuda = cuda
        self._profiler: torch.profiler.profile | None = None
        self._path: Path | None = None
        self._steps_left: int | None = None

    @property
    def running(self) -> bool:
        return self._profiler is not None

    def start(self, msg: StartProfile) -> tuple[bool, str]:
        if self._profiler is not None:
            return False, "Profiling is already in progress. Call /stop_profile first."
        activities = msg.activities if msg.activities is not None else list(ACTIVITIES)
        unknown = [a for a in activities if a not in ACTIVITIES]
        if unknown:
            return False, f"Profiler activities {unknown} are not supported by pdserve (use CPU and GPU)."
        kinds = [torch.profiler.ProfilerActivity.CPU] if "CPU" in activities else []
        if "GPU" in activities and self.cuda:
            kinds.append(torch.profiler.ProfilerActivity.CUDA)
        if not kinds:
            return (
                False,
                "Nothing to profile: this worker runs on the CPU and only GPU activity was asked for.",
            )
        output_dir = Path(msg.output_dir or os.environ.get(DEFAULT_DIR_ENV) or "/tmp")
        try:  # a directory that cannot be made is said now, not after the whole run
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return False, f"The trace directory {output_dir} cannot be created: {exc}"
        profiler = torch.profiler.profile(
            activities=kinds,
            with_stack=True if msg.with_stack is None else msg.with_stack,
            record_shapes=bool(msg.record_shapes),
        )
        profiler.start()
        self._profiler = profiler
        self._path = output_dir / f"{safe_label(msg.profile_id)}-{self.label}.trace.json.gz"
        self._steps_left = msg.num_steps
        logger.info("profiling starts; the trace will be saved to %s", self._path)
        return True, "Succeeded"

    def after_step(self) -> None:
        """Counts an engine step; stops the trace when `num_steps` were asked for and ran."""
        if self._profiler is None or self._steps_left is None:
            return
        self._steps_left -= 1
        if self._steps_left <= 0:
            ok, message = self.stop()
            if not ok:
                logger.warning("profiling after its last step: %s", message)

    def stop(self) -> tuple[bool, str]:
        """Stops the trace and writes it; the message names the file."""
        profiler, path = self._profiler, self._path
        if profiler is None or path is None:
            return False, "Profiling is not in progress. Call /start_profile first."
        self._profiler = self._path = self._steps_left = None
        profiler.stop()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            profiler.export_chrome_trace(str(path))
        except OSError as exc:
            return False, f"The trace could not be written to {path}: {exc}"
        logger.info("profiling done; the trace is saved to %s", path)
        return True, str(path)
