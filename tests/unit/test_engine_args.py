"""EngineArgs.validate on the GPU fast-path flags: a bad value is refused with the flag's name."""

from __future__ import annotations

import pytest

from pdserve.shared.args import EngineArgs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention_backend": "flash"}, "--attention-backend must be auto, triton or torch"),
        ({"cuda_graph_max_bs": 0}, "--cuda-graph-max-bs must be >= 1"),
        (
            {"enable_torch_compile": True, "attention_backend": "torch", "device": "cuda"},
            "--enable-torch-compile needs the triton attention backend on CUDA",
        ),
    ],
)
def test_fast_path_flags_are_validated(overrides: dict, message: str):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model_path="m", **overrides).validate()


def test_torch_compile_is_accepted_where_it_works():
    for overrides in ({}, {"device": "cuda"}, {"device": "cuda:1", "attention_backend": "triton"}):
        EngineArgs(model_path="m", enable_torch_compile=True, **overrides).validate()


def test_defaults_are_valid():
    args = EngineArgs(model_path="m")
    args.validate()
    assert args.attention_backend == "auto" and not args.disable_cuda_graph and args.cuda_graph_max_bs == 160
