"""Weight updates on a tensor-parallel engine: every rank reloads its slice, all or nothing.

The test process is rank 0 (an Engine with tp_size 2; rank 1 a real process started by
`TensorParallelRanks`, gloo on the CPU). A is a tiny random Llama, B a perturbed copy. Checked:
- A → B: success, and greedy tokens equal a TP=1 engine's on B (so rank 1 reloaded its slices:
  the logits of a half-updated model differ);
- a checkpoint of another shape is refused by the check, tokens stay B's;
- a checkpoint that vanishes after its check fails on every rank while copying: every rank
  restores B (tokens are B's again) and the message says it rolled back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from pdserve.shared.engine.weight_swap import UPDATE_OK
from pdserve.shared.launch.tp_ranks import TensorParallelRanks
from tests.helpers import zygote
from tests.helpers.checkpoint_copies import misshapen_copy, perturbed_copy
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11] * 23]
GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "ignore_eos": True}


def _args(model_dir: Path, tp_size: int) -> EngineArgs:
    return EngineArgs(
        model_path=str(model_dir),
        device="cpu",
        dtype="float32",
        tp_size=tp_size,
        page_size=4,
        max_total_tokens=512,
    )


def _tokens(engine: Engine) -> list[list[int]]:
    return [out["output_ids"] for out in engine.generate(PROMPTS, GREEDY)]


def test_tp2_weight_update_reaches_every_rank_all_or_nothing(tmp_path):
    a = make_tiny_model("llama", tmp_path / "a")
    b = perturbed_copy(a, tmp_path / "b", seed=7)
    misshapen = misshapen_copy(a, tmp_path / "misshapen", "model.layers.1.mlp.up_proj.weight")
    vanishing = perturbed_copy(a, tmp_path / "vanishing", seed=9)
    on_a, on_b = _tokens(Engine(_args(a, 1))), _tokens(Engine(_args(b, 1)))
    assert on_a != on_b

    died: list[tuple[int, int]] = []
    ranks = TensorParallelRanks(
        _args(a, 2), on_rank_exit=lambda r, s: died.append((r, s)), popen=zygote.popen
    )
    try:
        engine = Engine(_args(a, 2))
        assert _tokens(engine) == on_a
        assert engine.update_weights_from_disk(str(b)) == (True, UPDATE_OK)
        assert _tokens(engine) == on_b

        ok, message = engine.update_weights_from_disk(str(misshapen))
        assert not ok and "model.layers.1.mlp.up_proj.weight" in message
        assert _tokens(engine) == on_b

        checked = engine.check_weights(str(vanishing))
        (vanishing / "model.safetensors").unlink()
        ok, message = engine.update_weights_from_disk(str(vanishing), checked=checked)
        assert not ok and "Rolling back to original weights" in message
        assert _tokens(engine) == on_b  # both ranks restored B, not A

    finally:
        ranks.close()
    assert not died
