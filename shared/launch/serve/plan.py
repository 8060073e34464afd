"""What `serve` starts: a list of worker specs and the command line of every child.

Rules:
- Workers are a list of `WorkerSpec` (role, device); the launcher starts whatever the list holds.
  `--workers N`: mixed workers (plan_workers). `--prefill N --decode M`: N prefill then M decode
  workers (plan_disaggregated); the router pairs them.
- `--dp N` (SGLang's data parallelism: `--dp-size`, `--data-parallel-size`) is `--workers N`: N
  mixed workers behind the router. With `--tp M` each worker takes M GPUs of the list, without
  overlap: worker i gets the i-th run of M (`--device` of its rank 0 the run's first; its ranks
  take the GPUs after it, so a run must be consecutive GPU numbers); on the CPU it just starts N
  workers (plan_data_parallel). `--prefill N --decode M --tp K` on GPUs likewise: N + M runs of K
  GPUs, prefill workers first, no GPU shared.
- `--device` is one device or a comma list (`cpu`, `cuda`, `cuda:0,cuda:1`); a bare `cuda` means
  every visible GPU. Workers are spread over the listed devices round-robin. A CUDA device hosts
  one worker (each sizes its KV pool from the device's free memory, so two would fight over it);
  the CPU hosts any number, each with an equal share of the cores (OMP_NUM_THREADS) unless the
  environment already sets that.
- Prefill/decode on GPUs: one worker per GPU while there are enough GPUs; with fewer, workers
  share GPUs round-robin, and the k workers of one GPU split `--mem-fraction-static` between
  them: the i-th (0-based) gets the cumulative target f*(i+1)/k (a worker sizes its KV pool as
  target * device memory - memory already used, which counts the workers before it), so they
  start one after another (`wait_for`: the worker that must be ready first).
- Engine flags go to every worker when they differ from their defaults; the other router and
  worker flags go to their child when they differ from its default (passthrough.py says which).
  Workers bind loopback with free ports: only the router faces clients, and it finds the workers
  through Redis.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

from pdserve.shared.args import EngineArgs
from pdserve.shared.launch.serve.passthrough import PassThrough, derive

PD_ROLES = ("prefill", "decode")


class PlanError(ValueError):
    """A combination of flags `serve` cannot start (the message names the flags)."""


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # mixed | prefill | decode
    device: str
    index: int  # position among all workers: names its log prefix
    mem_fraction_static: float | None = None  # set on a shared GPU: this worker's cumulative target
    wait_for: str | None = None  # the name of the worker that must be ready before this one starts

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def parse_devices(text: str, cuda_count: int | None = None) -> list[str]:
    """`cpu` | `cuda` | `cuda:N` | a comma list of those. A bare `cuda` expands to every visible GPU
    (`cuda_count`; asked from torch when None)."""
    devices: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if item == "cuda":
            if cuda_count is None:
                import torch  # only here: serve itself never needs torch on CPU

                cuda_count = torch.cuda.device_count()
            if cuda_count == 0:
                raise PlanError("--device cuda: no CUDA device is visible")
            devices.extend(f"cuda:{i}" for i in range(cuda_count))
        elif item == "cpu" or (item.startswith("cuda:") and item[5:].isdigit()):
            devices.append(item)
        else:
            raise PlanError(f"--device: {item!r} is not cpu, cuda or cuda:N")
    if len(set(devices)) != len(devices):
        raise PlanError(f"--device lists a device twice: {text}")
    return devices


def plan_workers(devices: list[str], num_workers: int | None, role: str = "mixed") -> list[WorkerSpec]:
    """One spec per worker, devices round-robin; default: one worker per listed device."""
    count = len(devices) if num_workers is None else num_workers
    if count < 1:
        raise PlanError("--workers must be >= 1")
    specs = [WorkerSpec(role, devices[i % len(devices)], i) for i in range(count)]
    per_device = {d: sum(s.device == d for s in specs) for d in devices}
    crowded = [d for d, n in per_device.items() if d.startswith("cuda") and n > 1]
    if crowded:
        raise PlanError(
            f"--workers {count} puts several workers on {', '.join(crowded)}: one worker per GPU "
            "(list more devices with --device cuda:0,cuda:1,...)"
        )
    return specs


def plan_data_parallel(devices: list[str], num_workers: int | None, tp_size: int) -> list[WorkerSpec]:
    """Mixed workers of `tp_size` ranks each (see the rules); default: as many as the GPUs allow,
    one on the CPU."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if tp_size == 1 or not cuda:
        return plan_workers(devices, num_workers)
    count = len(cuda) // tp_size if num_workers is None else num_workers
    what = f"--dp {num_workers or 1} --tp {tp_size}"
    return [WorkerSpec("mixed", first, i) for i, first in enumerate(_gpu_runs(devices, count, tp_size, what))]


def _gpu_runs(devices: list[str], count: int, tp_size: int, what: str) -> list[str]:
    """The first GPU of each of `count` workers of `tp_size` ranks: worker i gets the i-th run of
    `tp_size` consecutive GPUs of the list, no GPU shared."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(cuda) != len(devices):
        raise PlanError("--tp > 1: --device lists the CPU beside GPUs")
    if count < 1 or count * tp_size > len(cuda):
        raise PlanError(f"{what} needs {max(1, count) * tp_size} GPUs, --device lists {len(cuda)}")
    firsts = []
    for i in range(count):
        run = [int(d.split(":")[1]) for d in cuda[i * tp_size : (i + 1) * tp_size]]
        if run != list(range(run[0], run[0] + tp_size)):
            raise PlanError(
                f"--tp {tp_size}: worker {i} would get GPUs {run}; a worker's ranks take "
                "consecutive GPUs (list them in order: --device cuda:0,cuda:1,...)"
            )
        firsts.append(cuda[i * tp_size])
    return firsts


def plan_disaggregated(
    devices: list[str],
    num_prefill: int,
    num_decode: int,
    mem_fraction_static: float = 0.85,
    tp_size: int = 1,
) -> list[WorkerSpec]:
    """num_prefill prefill then num_decode decode workers, devices round-robin (see the rules)."""
    if num_prefill < 0 or num_decode < 1:
        raise PlanError("--decode must be >= 1 and --prefill >= 0 (0: every request prefills at decode)")
    roles = ["prefill"] * num_prefill + ["decode"] * num_decode
    if tp_size > 1 and any(d.startswith("cuda") for d in devices):
        what = f"--prefill {num_prefill} --decode {num_decode} --tp {tp_size}"
        firsts = _gpu_runs(devices, len(roles), tp_size, what)
        return [WorkerSpec(role, first, i) for i, (role, first) in enumerate(zip(roles, firsts))]
    placed = [devices[i % len(devices)] for i in range(len(roles))]
    specs: list[WorkerSpec] = []
    for i, (role, device) in enumerate(zip(roles, placed)):
        sharing = [j for j, d in enumerate(placed) if d == device]
        if not device.startswith("cuda") or len(sharing) == 1:
            specs.append(WorkerSpec(role, device, i))
            continue
        rank = sharing.index(i)
        fraction = mem_fraction_static * (rank + 1) / len(sharing)
        before = specs[sharing[rank - 1]].name if rank else None
        specs.append(WorkerSpec(role, device, i, round(fraction, 4), before))
    return specs


def cpu_threads_env(specs: list[WorkerSpec]) -> dict[str, str]:
    """OMP_NUM_THREADS for CPU workers: the cores shared evenly, unless the environment sets it."""
    cpu_workers = sum(s.device == "cpu" for s in specs)
    if cpu_workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cpu_workers))}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def engine_flags(ns: argparse.Namespace) -> list[str]:
    """The engine flags that differ from EngineArgs' defaults (always --model-path), without --device."""
    defaults = EngineArgs()
    out = ["--model-path", ns.model_path]
    for f in dataclasses.fields(EngineArgs):
        if f.name in ("model_path", "device"):
            continue
        value = getattr(ns, f.name)
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            out.append(_flag(f.name))  # a switch that is on (defaults are off)
        else:
            out += [_flag(f.name), str(value)]
    return out


def worker_command(
    spec: WorkerSpec, ns: argparse.Namespace, redis_url: str, passthrough: PassThrough | None = None
) -> list[str]:
    """The worker's command line (passthrough: derived from the parsers when None)."""
    passthrough = passthrough or derive()
    cmd = [
        sys.executable, "-m", "pdserve.shared.launch.worker_cli",
        "--role", spec.role, "--device", spec.device, "--host", "127.0.0.1", "--port", "0",
        "--redis-url", redis_url, "--log-level", ns.log_level,
        *engine_flags(ns), *passthrough.worker_args(ns),
    ]  # fmt: skip
    if spec.role in PD_ROLES and "--kv-transfer-backend" not in cmd:  # both halves name it, even the default
        cmd += ["--kv-transfer-backend", ns.kv_transfer_backend]
    if spec.mem_fraction_static is not None:
        if "--mem-fraction-static" in cmd:  # the split replaces the user's total
            at = cmd.index("--mem-fraction-static")
            del cmd[at : at + 2]
        cmd += ["--mem-fraction-static", str(spec.mem_fraction_static)]
    return cmd


def router_command(
    ns: argparse.Namespace, redis_url: str, passthrough: PassThrough | None = None
) -> list[str]:
    passthrough = passthrough or derive()
    return [
        sys.executable, "-m", "pdserve.router.cli",
        "--host", ns.host, "--port", str(ns.port), "--redis-url", redis_url, "--log-level", ns.log_level,
        *passthrough.router_args(ns),
    ]  # fmt: skip
