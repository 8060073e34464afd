"""The Triton attention backend: same rules and results as TorchRefAttention (attention_ref.py).

- `attend` first stores the new tokens' K/V through `kv_pool.store`, then runs one kernel pass:
  decode_attention for ForwardMode.DECODE (q is [B, Hq, D], one token per request), otherwise
  extend_attention over all requests' new tokens at once.
- Decode under CUDA graphs: the backend owns the split-KV workspace. A captured graph replays the
  addresses it saw, so the workspace is allocated outside capture (the graph runner's warm-up
  calls size it) and reused by every later call that fits. When a larger batch needs more, a new
  buffer is made and the old one is kept alive, never freed: graphs captured on it stay valid.
- The number of KV splits depends only on the batch shape (or is fixed by the constructor), so a
  graph captured for a batch size always launches the same grid.
"""

from __future__ import annotations

import torch

from pdserve.kernels.decode_attention import decode_attention, decode_workspace_numel, num_kv_splits_for
from pdserve.kernels.extend_attention import extend_attention
from pdserve.shared.engine.forward_batch import ForwardBatch, ForwardMode

_CPU_SMS = 8  # the interpreter has no SMs; any fixed value keeps the split choice shape-only


class TritonAttention:
    """AttentionBackend on the Triton kernels. `num_kv_splits`: fixed decode splits, or None to
    pick them per batch size (`num_kv_splits_for`)."""

    def __init__(self, num_kv_splits: int | None = None) -> None:
        assert num_kv_splits is None or num_kv_splits >= 1
        self.num_kv_splits = num_kv_splits
        self._workspace: dict[torch.device, torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []  # outgrown workspaces that captured graphs may still use
        self._num_sms: dict[torch.device, int] = {}

    def decode_splits(self, batch_size: int, num_kv_heads: int, device: torch.device) -> int:
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        if device not in self._num_sms:
            cuda = device.type == "cuda"
            self._num_sms[device] = (
                torch.cuda.get_device_properties(device).multi_processor_count if cuda else _CPU_SMS
            )
        return num_kv_splits_for(batch_size, num_kv_heads, self._num_sms[device])

    def workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of at least `numel` elements, the same one for as long as it fits."""
        current = self._workspace.get(device)
        if current is None or current.numel() < numel:
            if current is not None:
                self._retired.append(current)
            current = torch.empty(numel, dtype=torch.float32, device=device)
            self._workspace[device] = current
        return current

    def attend(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:
        pool = batch.kv_pool
        pool.store(layer_id, batch.out_cache_loc, k, v)
        k_pages = pool.k_buffers[layer_id]
        if q.dtype != k_pages.dtype:  # the kernels read q and the pool in one dtype
            return self.attend_stored(layer_id, q.to(k_pages.dtype), batch, scale).to(q.dtype)
        return self.attend_stored(layer_id, q, batch, scale)

    def attend_stored(
        self, layer_id: int, q: torch.Tensor, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:
        """Attention over K/V already in the pool (q in the pool's dtype)."""
        k_pages, v_pages = batch.kv_pool.k_buffers[layer_id], batch.kv_pool.v_buffers[layer_id]
        if batch.mode == ForwardMode.DECODE:
            num_reqs, num_q_heads, head_dim = q.shape
            splits = self.decode_splits(num_reqs, k_pages.shape[2], q.device)
            workspace = self.workspace(
                decode_workspace_numel(num_reqs, num_q_heads, head_dim, splits), q.device
            )
            return decode_attention(
                q, k_pages, v_pages, batch.page_table, batch.seq_lens, scale,
                num_kv_splits=splits, workspace=workspace,
            )  # fmt: skip
        return extend_attention(
            q, k_pages, v_pages, batch.page_table, batch.seq_lens, batch.extend_lens, batch.extend_start_loc,
            max(batch.extend_lens_cpu, default=0), scale,
        )  # fmt: skip
