"""The pure-torch attention backend: the CPU path and the oracle the Triton kernels are tested against.

Rules (what every AttentionBackend must reproduce):
- First the new tokens' K/V go into the pool at `batch.out_cache_loc`, so a request's prefix and
  its new tokens are read back the same way, through its page-table row.
- Request i attends over its first `seq_len` tokens in the pool; a new token at absolute position p
  sees exactly the positions <= p (its cached prefix, and causally its own chunk), and with a
  sliding `window` only those > p - window; a `softcap` caps the scaled scores with tanh
  (kernels.attention_mask states both). The defaults, None, mean neither.
- Grouped-query attention: query head h reads kv head h // (num_q_heads // num_kv_heads).
- Scores, softmax and the weighted sum run in float32; the output is cast to q's dtype.
It loops over requests: clarity over speed.
"""

from __future__ import annotations

import torch

from pdserve.kernels.attention_mask import hidden_keys, soft_cap
from pdserve.shared.models.forward_batch import ForwardBatch


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [Tq, Hq, D] at absolute `q_positions` [Tq] over k/v [S, Hkv, D] (positions 0..S-1), in float32."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    k32 = k.float().repeat_interleave(group, dim=1)
    v32 = v.float().repeat_interleave(group, dim=1)
    scores = soft_cap(torch.einsum("qhd,khd->hqk", q.float(), k32) * scale, softcap)
    key_positions = torch.arange(k.shape[0], device=q.device)
    hidden = hidden_keys(key_positions, q_positions, window)  # [Tq, S]
    scores = scores.masked_fill(hidden[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v32)


class TorchRefAttention:
    """AttentionBackend in plain torch (CPU and CUDA); see the module rules."""

    def attend(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        pool = batch.kv_pool
        pool.store(layer_id, batch.out_cache_loc, k, v)
        out = torch.empty_like(q)
        page_size = pool.page_size
        start = 0
        for i, (prefix, extend) in enumerate(zip(batch.prefix_lens_cpu, batch.extend_lens_cpu)):
            if extend == 0:
                continue
            seq_len = prefix + extend
            num_pages = -(-seq_len // page_size)
            pages = batch.page_table[i, :num_pages].long()
            seq_k, seq_v = pool.gather(layer_id, pages, seq_len)
            rows = slice(start, start + extend)
            dense = dense_causal_attention(
                q[rows], seq_k, seq_v, batch.positions[rows], scale, window=window, softcap=softcap
            )
            out[rows] = dense.to(q.dtype)
            start += extend
        return out
