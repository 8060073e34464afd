"""The multi-GPU stages of bench/gpu_check.sh on the CPU: the scripts parse, `multi` expands to its
stages and the tp stage, the rate sweep asks bench_random for the right runs within its budget
(gpu_check.sh's `run`, `serve_start`, `serve_stop` and `bench_random` replaced by recorders: nothing
GPU-only runs), a host of fewer than two GPUs skips every stage, and the serve flags the stages use
place the workers on the GPUs each run needs (each worker makes its GPU the current device)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pdserve.shared.launch.serve.cli import _plan, build_parser
from pdserve.shared.launch.serve.plan import worker_command
from pdserve.shared.launch.worker_gpu import cuda_index

ROOT = Path(__file__).resolve().parents[2]
MULTI = "multi_kv multi_pd multi_split multi_threshold"  # and the tp stage
RECORDERS = """
run() { echo "run $*" >> "$SUMMARY"; }
serve_start() { echo "serve_start $*" >> "$SUMMARY"; }
serve_stop() { echo "serve_stop" >> "$SUMMARY"; }
bench_random() { echo "bench_random $*" >> "$SUMMARY"; }
"""


def _bash(script: str, tmp_path: Path, gpus: int = 2) -> list[str]:
    """Runs script after sourcing gpu_multi.sh (nvidia-smi listing `gpus` GPUs); the recorded lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f'echo "GPU {i}: H100"\n' for i in range(gpus)))
    smi.chmod(0o755)
    summary = tmp_path / "summary"
    summary.write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SUMMARY": str(summary),
        "OUT": str(tmp_path),
    }
    env.pop("MULTI_SECONDS", None)
    full = f"set -u\nsource bench/gpu_multi.sh\n{RECORDERS}\n{script}"
    out = subprocess.run(
        ["bash", "-c", full], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return summary.read_text().splitlines() + out.stdout.splitlines()


def test_the_scripts_parse_and_multi_expands(tmp_path):
    for script in ("bench/gpu_check.sh", "bench/gpu_multi.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True, timeout=30)
    want = "kv multi_kv multi_pd tp multi_split multi_threshold tests"
    assert _bash("expand_stages kv multi tests", tmp_path) == [want]
    assert _bash("expand_stages multi_split multi_tp", tmp_path) == ["multi_split tp"]
    assert _bash("for r in 0.2 1.5 8; do num_prompts $r; done", tmp_path) == ["8", "12", "64"]
    # gpu_check.sh hands every multi_* stage to multi_stage
    assert "STAGES=$(expand_stages ${*:-" in (ROOT / "bench/gpu_check.sh").read_text()
    assert "multi_*)\n    multi_stage" in (ROOT / "bench/gpu_check.sh").read_text()


def test_the_sweep_asks_for_each_rate_until_its_budget_is_spent(tmp_path):
    lines = _bash(
        'sweep 1p1d $((SECONDS + 1000)) "prefill-heavy:4096:256:1" "short-long:2048:256:0.015625"', tmp_path
    )

    def want(mix: str, rate: str, n: int, lengths: str, ratio: str) -> str:
        return (
            f"bench_random multi-1p1d-{mix}-r{rate} 90 {lengths} --num-prompts {n} --request-rate {rate} "
            f"--random-range-ratio {ratio} --warmup-requests 2 --output-details "
            f"--output-file {tmp_path}/multi/1p1d-{mix}.jsonl"
        )

    assert lines == [
        want("prefill-heavy", "1.5", 12, "4096 256", "1"),
        want("prefill-heavy", "3", 24, "4096 256", "1"),
        want("prefill-heavy", "6", 48, "4096 256", "1"),
        want("short-long", "3", 24, "2048 256", "0.015625"),
        want("short-long", "6", 48, "2048 256", "0.015625"),
    ]
    spent = _bash('MULTI_RATES_DECODE="1 2"; sweep 2mixed $SECONDS "decode-heavy:256:1024:1"', tmp_path)
    assert spent == [
        "| multi-2mixed-decode-heavy-r1 | skipped: stage budget spent | 0 s |",
        "| multi-2mixed-decode-heavy-r2 | skipped: stage budget spent | 0 s |",
    ]


def test_fewer_than_two_gpus_skip_every_stage(tmp_path):
    lines = _bash(f"for s in {MULTI}; do multi_stage $s; done", tmp_path, gpus=1)
    assert lines == [f"| {s} | skipped: 1 GPU(s), needs 2 | 0 s |" for s in MULTI.split()]


def test_the_stages_serve_flags_place_one_worker_per_gpu():
    script = (ROOT / "bench/gpu_multi.sh").read_text()
    pd_flags = "--prefill 1 --decode 1 --device cuda:0,cuda:1"
    mixed_flags = "--workers 2 --device cuda:0,cuda:1"
    assert (
        f"serve_start multi-1p1d {pd_flags}" in script and f"serve_start multi-2mixed {mixed_flags}" in script
    )
    parser = build_parser()

    def placed(flags: str) -> list[tuple[str, str, object]]:
        ns = parser.parse_args(flags.split())
        specs = _plan(ns)
        for spec in specs:  # the device each worker process is started with, and makes current
            cmd = worker_command(spec, ns, "redis://h:1/0")
            assert cmd[cmd.index("--device") + 1] == spec.device
            assert cuda_index(spec.device) == int(spec.device.split(":")[1])
        return [(s.name, s.device, s.mem_fraction_static) for s in specs]

    # P alone on GPU 0 and D alone on GPU 1: each sizes its pool from its whole GPU (no split)
    assert placed(pd_flags) == [("prefill-0", "cuda:0", None), ("decode-1", "cuda:1", None)]
    assert placed(mixed_flags) == [("mixed-0", "cuda:0", None), ("mixed-1", "cuda:1", None)]
    # the CPU and a bare `cuda` leave the current device alone
    assert (cuda_index("cpu"), cuda_index("cuda"), cuda_index("cuda:12")) == (None, None, 12)
