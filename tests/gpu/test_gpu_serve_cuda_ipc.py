"""`serve --prefill 1 --decode 1 --kv-transfer-backend cuda_ipc` on one GPU (two worker processes
sharing it; the prefill worker writes into the decode worker's pool through CUDA IPC) answers
/generate with the mixed engine's greedy tokens (tiny random Llama, float32), and `auto`, the
default, does the same. (On a host of two GPUs `--device cuda` puts P on cuda:0 and D on cuda:1.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.pd_serve import generate, mixed_greedy, prompt, start_pd_serve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["cuda_ipc", "auto"])
def test_serve_prefill_decode_over_cuda_ipc_equals_mixed(tmp_path: Path, backend: str):
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [prompt(n, seed=60 + n) for n in (20, 70, 300)]  # all above the local-prefill threshold
    serve, base, model_dir = start_pd_serve(tmp_path, backend, "cuda")
    try:
        got = [generate(base, p) for p in prompts]  # one at a time: decode batches of one
    finally:
        serve.close()
    assert got == mixed_greedy(model_dir, prompts)
