"""On one CUDA GPU: a prefill engine and a decode engine with their own KV pools, pages moved by the
zmq backend (GPU pools staged through pinned host memory) or the cuda_ipc backend (the page-move
kernel writing into the decode pool; in one process the pool is found in the process's own table
of exports, since CUDA does not open its own IPC handles), give the mixed engine's greedy tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.decode.decode_engine import DecodeEngine
from pdserve.kvtransfer import make_kv_manager
from pdserve.prefill.prefill_engine import PrefillEngine
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.pd_pair import PDPair
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["zmq", "cuda_ipc"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_decode_on_cuda_equals_mixed(tmp_path: Path, dtype: str, backend: str):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model("qwen3", tmp_path))
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (1, 9, 40, 150, 300)]
    args = {
        "model_path": model_dir,
        "device": "cuda",
        "dtype": dtype,
        "max_total_tokens": 4096,
        "chunked_prefill_size": 32,
    }
    params = {"temperature": 0.0, "max_new_tokens": 16}
    mixed = Engine(EngineArgs(**args)).generate(prompts, params, return_logprob=True)
    prefill = PrefillEngine(EngineArgs(**args), lambda pool: make_kv_manager(backend, pool, "prefill-0"))
    decode = DecodeEngine(EngineArgs(**args), lambda pool: make_kv_manager(backend, pool, "decode-0"))
    try:
        pair = PDPair(prefill, decode)
        outs = pair.generate(prompts, params, return_logprob=True)
        for i, (got, want) in enumerate(zip(outs, mixed)):
            if dtype == "float32":
                assert got["output_ids"] == want["output_ids"], f"{dtype} prompt {i}"
            else:
                # bf16 decode batches of other sizes may round differently; the first token comes from
                # the same prefill computation on both paths and must agree exactly
                assert got["output_ids"][0] == want["output_ids"][0], f"{dtype} prompt {i}"
        pair.assert_idle()
    finally:
        prefill.kv_manager.close()
        decode.kv_manager.close()
