"""The expert-distribution recorder's counting, exactly: every real token counted once per MoE layer
per chosen expert while recording, never a padded row or a pass run while not recording; one
buffer row per pass (circular, or growing with -1); a dump is SGLang's stat-mode file and resets.
"""

from __future__ import annotations

import torch

from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.expert_distribution import ExpertDistributionRecorder, attach_expert_recorder
from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.loader import load_model
from pdserve.shared.models.moe_block import SparseMoeBlock
from tests.helpers.tiny_models import tiny_config

CPU = torch.device("cpu")


def _pass(recorder: ExpertDistributionRecorder, real: int, by_layer: dict[int, list[list[int]]]) -> None:
    recorder.begin_forward(real)
    for layer, ids in by_layer.items():
        recorder.on_select_experts(layer, torch.tensor(ids))
    recorder.end_forward()


def test_counts_each_real_token_once_per_chosen_expert():
    recorder = ExpertDistributionRecorder(num_layers=3, num_experts=4, device=CPU, buffer_size=8)
    _pass(recorder, 2, {0: [[0, 1], [1, 3]]})  # before start: nothing
    recorder.start()
    _pass(recorder, 3, {0: [[0, 1], [1, 3], [2, 1]], 2: [[3, 0], [3, 2], [0, 3]]})  # a prefill of 3
    # a decode step replayed from a graph bucket of 4 with 2 real rows: rows 2 and 3 are padding
    _pass(recorder, 2, {0: [[2, 3], [0, 1], [3, 3], [3, 3]], 2: [[1, 0], [1, 2], [0, 0], [0, 0]]})
    recorder.stop()
    _pass(recorder, 1, {0: [[0, 2]]})  # after stop: nothing
    counts = recorder.logical_count()
    assert counts.shape == (8, 3, 4) and counts.dtype == torch.int32
    assert counts[0].tolist() == [[1, 3, 1, 1], [0, 0, 0, 0], [2, 0, 1, 3]]
    assert counts[1].tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 2, 1, 0]]
    assert counts[2:].sum().item() == 0
    assert counts.sum().item() == (3 + 2) * 2 * 2  # tokens x top-k x MoE layers


def test_circular_buffer_wraps_and_growing_buffer_keeps_every_pass():
    ring = ExpertDistributionRecorder(1, 2, CPU, buffer_size=2)
    grow = ExpertDistributionRecorder(1, 2, CPU, buffer_size=-1)
    for recorder in (ring, grow):
        recorder.start()
        for n in range(1, 201):
            _pass(recorder, n, {0: [[n % 2]] * n})
    assert ring.logical_count().tolist() == [[[0, 199]], [[200, 0]]]  # the last two passes
    assert grow.logical_count().shape == (200, 1, 2)
    assert grow.logical_count().sum().item() == sum(range(1, 201))


def test_dump_writes_sglang_stat_file_and_resets(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path / "records"))
    recorder = ExpertDistributionRecorder(2, 3, CPU, buffer_size=4)
    recorder.start()
    _pass(recorder, 1, {1: [[2, 0]]})
    path = recorder.dump("1712.5", "mixed-127.0.0.1-30001")
    assert path == tmp_path / "records" / "expert_distribution_recorder_1712.5_mixed-127.0.0.1-30001.pt"
    record = torch.load(path)
    assert record["rank"] == 0 and record["average_utilization_rate_over_window"] is None
    assert record["logical_count"].sum(0).tolist() == [[0, 0, 0], [1, 0, 1]]
    assert recorder.logical_count().sum().item() == 0  # reset after the dump


def test_attached_only_with_the_mode_and_experts():
    moe = load_model(ModelConfig.from_hf_config(tiny_config("qwen2_moe_sparse")), None, "dummy")
    dense = load_model(ModelConfig.from_hf_config(tiny_config("qwen2")), None, "dummy")
    on = EngineArgs(expert_distribution_recorder_mode="stat")
    assert attach_expert_recorder(moe, EngineArgs(), 4, CPU) is None
    assert attach_expert_recorder(dense, on, 2, CPU) is None
    recorder = attach_expert_recorder(moe, on, 4, CPU)
    assert recorder is not None and (recorder.num_layers, recorder.num_experts) == (4, 8)
    blocks = [m for m in moe.modules() if isinstance(m, SparseMoeBlock)]
    assert [b.layer_id for b in blocks] == [1] and blocks[0].observer is recorder
    # a forward pass through the block counts its tokens x top-k
    recorder.start()
    recorder.begin_forward(5)
    blocks[0](torch.randn(5, 64))
    recorder.end_forward()
    assert recorder.logical_count()[0, 1].sum().item() == 5 * 2
