"""Engine and worker arguments: one dataclass, buildable without a checkpoint, and its CLI flags.

Flag names follow SGLang's server arguments where SGLang has them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KV_CACHE_DTYPES = ("auto", "fp8_e5m2", "fp8_e4m3")


@dataclass
class EngineArgs:
    model_path: str = DEFAULT_MODEL
    tokenizer_path: str | None = None
    load_format: str = "auto"  # auto | safetensors | dummy
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    context_length: int | None = None
    served_model_name: str | None = None
    trust_remote_code: bool = False
    device: str = "cpu"  # cpu | cuda | cuda:N
    random_seed: int = 0

    page_size: int = 16
    mem_fraction_static: float = 0.85  # GPU only: share of device memory for weights + KV pool
    max_total_tokens: int | None = None  # KV pool capacity in tokens; default: 65,536 on CPU
    disable_radix_cache: bool = False
    chunked_prefill_size: int = 8192  # -1 disables chunking
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    schedule_policy: str = "fcfs"  # fcfs | lpm
    # fp8 weights (shared/models/quantization.py): quantize a 16-bit checkpoint at load; fp8
    # checkpoints are detected without it
    quantization: str | None = None  # None | fp8
    # the KV pool's dtype (shared/engine/kv_pool.py): auto (the model's) | fp8_e5m2 | fp8_e4m3
    kv_cache_dtype: str = "auto"
    # serve embeddings (EmbedRequest) instead of generating; also inferred from the model
    # (shared/models/pooling.py)
    is_embedding: bool = False

    # GPU fast path
    attention_backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | triton | torch
    cuda_graph_max_bs: int = 160  # decode batches up to this size replay a captured CUDA graph
    disable_cuda_graph: bool = False
    # Overlap scheduling (shared/engine/batch_pipeline.py): on by default on CUDA, off on the CPU.
    disable_overlap_schedule: bool = False
    # Constrained decoding: text the grammar forces is appended without decode steps (jump_forward.py)
    enable_jump_forward: bool = False
    enable_torch_compile: bool = False  # compiled decode graphs (small batches) on CUDA, every pass on CPU
    # MoE models: count each expert's routed tokens per layer (shared/engine/expert_distribution.py)
    expert_distribution_recorder_mode: str | None = None  # None (off) | stat
    expert_distribution_recorder_buffer_size: int = 1000  # forward passes kept; -1: all
    # Tensor parallelism (shared/models/tensor_parallel.py): ranks of one worker, one process each
    tp_size: int = 1
    # Ranks on several hosts (shared/launch/tp_node.py): --tp N over --nnodes K hosts, N/K ranks each;
    # rank 0's host (node 0) hosts the process group's rendezvous at --dist-init-addr HOST:PORT
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None

    @property
    def effective_tokenizer_path(self) -> str:
        return self.tokenizer_path or self.model_path

    @property
    def tp_ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def validate(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"--load-format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.dtype not in (
            "auto",
            "bfloat16",
            "float16",
            "float32",
            "half",
            "float",
            "bf16",
            "fp16",
            "fp32",
        ):
            raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"--schedule-policy must be fcfs or lpm, got {self.schedule_policy!r}")
        if self.chunked_prefill_size != -1 and self.chunked_prefill_size < self.page_size:
            raise ValueError("--chunked-prefill-size must be -1 or at least --page-size")
        if self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be >= 1")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"--attention-backend must be auto, triton or torch, got {self.attention_backend!r}"
            )
        if self.expert_distribution_recorder_mode not in (None, "stat"):
            raise ValueError(
                "--expert-distribution-recorder-mode must be stat (pdserve has no per-token or per-pass "
                f"recording), got {self.expert_distribution_recorder_mode!r}"
            )
        if (
            self.expert_distribution_recorder_buffer_size == 0
            or self.expert_distribution_recorder_buffer_size < -1
        ):
            raise ValueError("--expert-distribution-recorder-buffer-size must be >= 1, or -1 for no bound")
        if self.tp_size < 1:
            raise ValueError("--tp must be >= 1")
        if self.cuda_graph_max_bs < 1:
            raise ValueError("--cuda-graph-max-bs must be >= 1")
        self._validate_nodes()
        if self.enable_torch_compile and self.attention_backend == "torch" and self.device.startswith("cuda"):
            # The torch backend stores K/V with a plain Triton launch and torch indexing, which
            # torch.compile functionalizes: it copies the whole KV pool around them (a 22.6 GiB
            # buffer for an 8B model on an H200, bench/RESULTS.md). The Triton backend's kernels are
            # custom ops that declare their in-place writes (kernels.custom_ops).
            raise ValueError(
                "--enable-torch-compile needs the triton attention backend on CUDA: with "
                "--attention-backend torch, torch.compile copies the whole KV pool"
            )

    def _validate_nodes(self) -> None:
        if self.nnodes < 1:
            raise ValueError("--nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}) for --nnodes {self.nnodes}")
        if self.tp_size % self.nnodes:
            raise ValueError(
                f"--tp {self.tp_size} does not split over --nnodes {self.nnodes}: each node runs tp/nnodes ranks"
            )
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ValueError(f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.dist_init_addr is not None:
            split_host_port(self.dist_init_addr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per EngineArgs field (`--model-path` for `model_path`, booleans as switches)."""
    defaults = EngineArgs()
    choices = {
        "load_format": ["auto", "safetensors", "dummy"],
        "dtype": ["auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16", "fp32"],
        "schedule_policy": ["fcfs", "lpm"],
        "attention_backend": ["auto", "triton", "torch"],
        "expert_distribution_recorder_mode": ["stat"],
        "quantization": ["fp8"],
        "kv_cache_dtype": list(KV_CACHE_DTYPES),
    }
    aliases = {  # SGLang's spellings
        "tp_size": ("--tp", "--tensor-parallel-size"),
        "dist_init_addr": ("--nccl-init-addr", "--nccl-init"),
    }
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action="store_true", default=default)
            continue
        kind = _parse_type(f)
        parser.add_argument(
            flag,
            *aliases.get(f.name, ()),
            dest=f.name,
            type=kind,
            default=default,
            choices=choices.get(f.name),
        )


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name)}
    args = EngineArgs(**values)
    args.validate()
    return args


def split_host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` (--dist-init-addr) as (host, port); ValueError naming the flag otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--dist-init-addr must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _parse_type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


__all__ = [
    "DEFAULT_MODEL",
    "KV_CACHE_DTYPES",
    "EngineArgs",
    "add_engine_args",
    "engine_args_from",
    "split_host_port",
]
