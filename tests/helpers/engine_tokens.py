"""Expected greedy tokens from a single-process (TP=1) engine in the test process (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine


def tp1_greedy_tokens(
    model_dir: str | Path, prompts: list[list[int]], sampling_params: dict, quantization: str | None = None
) -> list[list[int]]:
    """Each prompt's output ids from a TP=1 engine on `model_dir`."""
    args = EngineArgs(
        model_path=str(model_dir),
        device="cpu",
        dtype="float32",
        max_total_tokens=512,
        quantization=quantization,
    )
    return [out["output_ids"] for out in Engine(args).generate(prompts, sampling_params)]
