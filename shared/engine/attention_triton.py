"""The Triton attention backend: same rules and results as TorchRefAttention (attention_ref.py).

- `attend` first stores the new tokens' K/V into the pool, then runs one kernel pass:
  decode_attention for ForwardMode.DECODE (q is [B, Hq, D], one token per request), otherwise
  extend_attention over all requests' new tokens at once. `attend_rotary` takes q and k before
  rope and rotates them in the launch that stores K/V (kernels.rope.rotary_store_kv): the fast
  path's attention layers call it (shared.models.fast_path.RopeFusedAttention). Both take the
  layer's `window` and `softcap` (keywords; None = none) and hand them to the kernels.
- Every kernel goes through its torch custom op (kernels.custom_ops), given the pool's single `kv`
  tensor and the layer: under torch.compile the pool is then written in place, never copied.
- Decode under CUDA graphs: the backend owns the split-KV workspace. A captured graph replays the
  addresses it saw, so the workspace is allocated outside capture (the graph runner's warm-up
  calls size it) and reused by every later call that fits. When a larger batch needs more, a new
  buffer is made and the old one is kept alive, never freed: graphs captured on it stay valid.
- An fp8 pool: every op gets the pool's `kv_scales` (kernels.fp8_kv); q stays in the model's
  dtype (the kernels read fp8 K/V as q's dtype).
- The number of KV splits depends only on the batch shape (or is fixed by the constructor), so a
  graph captured for a batch size always launches the same grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdserve.kernels.custom_ops import (
    decode_attention_op,
    extend_attention_op,
    rotary_store_kv_op,
    store_kv_op,
)
from pdserve.kernels.decode_attention import decode_workspace_numel, num_kv_splits_for
from pdserve.shared.models.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from pdserve.shared.models.fast_path import RopeInputs

# The interpreter has no SMs: a fixed value keeps the split choice shape-only, and the smallest
# (two splits) keeps the merge in every decode step while the interpreter runs up to 8x fewer programs
# than at 8 (the kernel's own tests cover 1 to 16 splits and empty ones)
_CPU_SMS = 1


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
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        store_kv_op(batch.kv_pool.kv, layer_id, batch.out_cache_loc, k, v, batch.kv_pool.kv_scales)
        return self.attend_stored(layer_id, q, batch, scale, window=window, softcap=softcap)

    def attend_rotary(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RopeInputs,
        batch: ForwardBatch,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """`attend` of q and k BEFORE rope: rotates them in place and stores K/V in one launch."""
        rotary_store_kv_op(
            q, k, v, rope.positions, rope.inv_freq, rope.attention_scaling,
            batch.kv_pool.kv, layer_id, batch.out_cache_loc, batch.kv_pool.kv_scales,
        )  # fmt: skip
        return self.attend_stored(layer_id, q, batch, scale, window=window, softcap=softcap)

    def attend_stored(
        self,
        layer_id: int,
        q: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Attention over K/V already in the pool; the output in q's dtype."""
        kv, kv_scales = batch.kv_pool.kv, batch.kv_pool.kv_scales
        if q.dtype != kv.dtype and kv_scales is None:  # a 16-bit pool is read in q's dtype
            out = self.attend_stored(layer_id, q.to(kv.dtype), batch, scale, window=window, softcap=softcap)
            return out.to(q.dtype)
        window_arg, softcap_arg = window or 0, softcap or 0.0  # the ops' "none"
        if batch.mode == ForwardMode.DECODE:
            num_reqs, num_q_heads, head_dim = q.shape
            splits = self.decode_splits(num_reqs, kv.shape[4], q.device)
            workspace = self.workspace(
                decode_workspace_numel(num_reqs, num_q_heads, head_dim, splits), q.device
            )
            return decode_attention_op(
                q, kv, layer_id, batch.page_table, batch.seq_lens, scale, splits, workspace,
                window_arg, softcap_arg, kv_scales,
            )  # fmt: skip
        return extend_attention_op(
            q, kv, layer_id, batch.page_table, batch.seq_lens, batch.extend_lens, batch.extend_start_loc,
            max(batch.extend_lens_cpu, default=0), scale, window_arg, softcap_arg, kv_scales,
        )  # fmt: skip
