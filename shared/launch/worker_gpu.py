"""The worker process's current CUDA device.

A worker placed on `cuda:N` (serve spreads workers over the GPUs: P on cuda:0 and D on cuda:1, or one
mixed worker per GPU) makes cuda:N the current device of its main thread before it builds anything:
Triton launches its kernels on the current device and CUDA graphs capture on the current device's
streams, so weights and a KV pool on cuda:1 driven from the default cuda:0 would run kernels on the
wrong GPU. Every GPU stays visible (CUDA_VISIBLE_DEVICES untouched): NCCL and CUDA IPC peers need
them. Tensor-parallel ranks set their own device when they join their group (tp_ranks.py); rank 0's
is this one.
"""

from __future__ import annotations


def cuda_index(device: str) -> int | None:
    """N of `cuda:N`; None for the CPU and a bare `cuda` (the current device already)."""
    kind, _, index = device.partition(":")
    return int(index) if kind == "cuda" and index.isdigit() else None


def use_worker_gpu(device: str) -> None:
    """Makes the worker's GPU the current device of the calling thread (nothing for the CPU)."""
    index = cuda_index(device)
    if index is not None:
        import torch

        torch.cuda.set_device(index)
