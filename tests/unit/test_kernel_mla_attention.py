"""The attention kernels over MLA's one-plane pool (Triton, run by the interpreter on CPU).

MLA stores one vector per token (kv_lora_rank + qk_rope_head_dim: 576 for DeepSeek-V2-Lite) as a
single KV head and reads V out of the same pages: the kernels get `v_pages is k_pages` and a head
dim of 576. Both kernels match their references there, the references match dense attention with
V = K, and the Triton backend with the fast path runs a tiny DeepSeek-V2 to transformers' logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pdserve.kernels.decode_attention import decode_attention, decode_attention_ref
from pdserve.kernels.extend_attention import extend_attention, extend_attention_ref
from pdserve.shared.engine.attention_ref import dense_causal_attention
from pdserve.shared.engine.attention_triton import TritonAttention
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool
from pdserve.shared.models.fast_path import use_triton_kernels
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode
from tests.helpers.paged_kv import random_paged_kv
from tests.helpers.tiny_models import make_tiny_model
from tests.unit.test_models_tiny import ATOL, PAGE_SIZE, Tiny, _prompt

MLA_DIM, HEADS = 576, 4
SCALE = 0.11  # V2-Lite's: 192 ** -0.5 times yarn's mscale ** 2


def _latent_pages(seq_lens: list[int], seed: int):
    """One KV head of 576 per token in NaN-filled pages; V is K (the same tensor)."""
    kv = random_paged_kv(seq_lens, 4, 1, MLA_DIM, torch.float32, torch.Generator().manual_seed(seed))
    return kv.k_pages, kv.page_table, kv.keys


def test_extend_over_576_with_values_read_from_keys():
    requests = [(5, 0), (3, 9), (0, 2)]  # (extend, prefix): a prompt, a chunk after a prefix, idle
    seq_lens = [e + p for e, p in requests]
    pages, table, keys = _latent_pages(seq_lens, seed=1)
    extend_lens = [e for e, _ in requests]
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(sum(extend_lens), HEADS, MLA_DIM, generator=gen)
    lens = torch.tensor(seq_lens), torch.tensor(extend_lens), torch.tensor([0, 5, 8])
    got = extend_attention(q, pages, pages, table, *lens, max(extend_lens), SCALE)
    want = extend_attention_ref(q, pages, pages, table, *lens, SCALE)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    start = 0
    for (extend, prefix), k in zip(requests, keys):
        rows = slice(start, start + extend)
        dense = dense_causal_attention(q[rows], k, k, torch.arange(prefix, prefix + extend), SCALE)
        torch.testing.assert_close(want[rows], dense, rtol=0, atol=1e-5)
        start += extend


def test_decode_over_576_with_values_read_from_keys():
    seq_lens = [1, 7, 13]
    pages, table, keys = _latent_pages(seq_lens, seed=3)
    q = torch.randn(len(seq_lens), HEADS, MLA_DIM, generator=torch.Generator().manual_seed(4))
    got = decode_attention(q, pages, pages, table, torch.tensor(seq_lens), SCALE, num_kv_splits=2)
    want = decode_attention_ref(q, pages, pages, table, torch.tensor(seq_lens), SCALE)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for i, k in enumerate(keys):
        dense = dense_causal_attention(q[i : i + 1], k, k, torch.tensor([len(k) - 1]), SCALE)
        torch.testing.assert_close(want[i : i + 1], dense, rtol=0, atol=1e-5)


@torch.no_grad()
def test_triton_backend_runs_tiny_deepseek_to_hf_logits(tmp_path: Path):
    tiny = Tiny("deepseek_v2", make_tiny_model("deepseek_v2", tmp_path / "m"))
    use_triton_kernels(tiny.model)  # Triton RMSNorm, SiLU-and-mul and the fused MoE as well
    c = tiny.config
    pool = PagedKVPool(KVPoolShape(c.num_layers, 16, PAGE_SIZE, 1, c.head_dim, 1), torch.float32, "cpu")
    ids, pages, backend = _prompt(11, seed=5), [7, 2, 12], TritonAttention(num_kv_splits=2)
    got, done = [], 0
    for mode, n in (
        (ForwardMode.EXTEND, 6),
        (ForwardMode.EXTEND, 3),
        (ForwardMode.DECODE, 1),
        (ForwardMode.DECODE, 1),
    ):
        rows = list(range(n))
        batch = ForwardBatch.build(
            mode, ids[done : done + n], [done], [n], [pages], PAGE_SIZE, pool, backend, rows
        )
        got.append(tiny.model.compute_logits(tiny.model(batch)))
        done += n
    assert (torch.cat(got) - tiny.hf_logits(ids)).abs().max().item() < ATOL
