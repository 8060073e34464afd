"""MLA on a CUDA GPU: the compiled attention kernels at head dim 576 with V read from the K pages
(half precision, against their references), and a tiny DeepSeek-V2 served by the engine (Triton
backend, fast path, CUDA graphs) in float32 with transformers' greedy tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.shared.args import EngineArgs
from pdserve.shared.engine.engine import Engine
from tests.helpers.hf_reference import hf_greedy
from tests.helpers.paged_kv import random_paged_kv
from tests.helpers.tiny_deepseek import DEEPSEEK_KINDS
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_576_values_from_keys(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    requests = [(1, 0), (37, 5), (16, 100), (0, 3)]
    seq_lens = [e + p for e, p in requests]
    kv = random_paged_kv(seq_lens, 16, 1, 576, dtype, gen)
    pages, table = kv.k_pages.cuda(), kv.page_table.cuda()
    extend_lens = [e for e, _ in requests]
    starts = [sum(extend_lens[:i]) for i in range(len(requests))]
    q = torch.randn(sum(extend_lens), 16, 576, generator=gen).to(dtype).cuda()
    lens = tuple(torch.tensor(x).cuda() for x in (seq_lens, extend_lens, starts))
    got = extend_attention(q, pages, pages, table, *lens, max(extend_lens), 0.11)
    want = extend_attention_ref(q, pages, pages, table, *lens, 0.11)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)
    dq = torch.randn(len(seq_lens), 16, 576, generator=gen).to(dtype).cuda()
    sl = torch.tensor(seq_lens).cuda()
    got = decode_attention(dq, pages, pages, table, sl, 0.11, num_kv_splits=4)
    want = decode_attention_ref(dq, pages, pages, table, sl, 0.11)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("kind", DEEPSEEK_KINDS)
def test_tiny_deepseek_greedy_parity_cuda_float32(kind: str, tmp_path: Path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = str(make_tiny_model(kind, tmp_path))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (1, 5, 33, 64)]
    expected = [ids for ids, _ in hf_greedy(model_dir, prompts, 16)]
    args = EngineArgs(
        model_path=model_dir, device="cuda", dtype="float32", chunked_prefill_size=32, max_total_tokens=4096
    )
    engine = Engine(args)
    assert engine.runner.graphs is not None and engine.runner.pool.kv.shape[1] == 1
    outs = engine.generate(prompts, {"temperature": 0.0, "max_new_tokens": 16})
    assert [o["output_ids"] for o in outs] == expected
