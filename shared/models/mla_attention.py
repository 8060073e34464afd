"""Multi-head latent attention (DeepSeek-V2), computed in the absorbed form over a compressed KV.

Per token and layer the KV pool holds one vector of kv_lora_rank + qk_rope_head_dim (576 for
DeepSeek-V2-Lite): the normed latent c_kv, then the roped shared key k_pe. It is stored as one KV
head in a pool of one plane (ModelConfig.kv_planes == 1), and serves as both K and V:

- q_nope [T, H, nope] is multiplied per head by the key half of kv_b_proj (W_UK [H, nope, r]), so
  it lives in latent space; q = [q_nope W_UK, q_pe] [T, H, r + rope] and k = v = [c_kv, k_pe];
  q . k = q_nope . (W_UK c_kv) + q_pe . k_pe, the scores of the expanded form.
- The attention output [T, H, r + rope] keeps its first r dims (the latent weighted by the
  probabilities) and goes through the value half of kv_b_proj per head (W_UV [H, v, r]), then o_proj.

So the attention backends see plain MQA (one KV head, head dim r + rope, V = K) and never learn MLA.

Rope (transformers' DeepSeek-V2 layout): pairs of adjacent dims (2i, 2i + 1) rotate together, by
the same frequencies and cos/sin scaling as RotaryEmbedding (yarn's attention factor included).
YaRN also scales the softmax: by mscale(factor, mscale_all_dim)**2 over the whole q.k.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pdserve.shared.models.config import ModelConfig
from pdserve.shared.models.forward_batch import ForwardBatch
from pdserve.shared.models.layers import RMSNorm

# transformers builds the two latent norms with its default eps, not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def mla_softmax_scale(hf_config: Any) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under a scaled rope."""
    scale = float(hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if rope_type != "default" and mscale_all_dim:
        m = yarn_mscale(float(params["factor"]), float(mscale_all_dim))
        scale *= m * m
    return scale


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def apply_interleaved_rotary(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] pairwise (dims 2i, 2i + 1) by RotaryEmbedding's cos/sin."""
    cos, sin = cos_sin
    half = cos.shape[-1] // 2  # RotaryEmbedding repeats the angles: [freqs, freqs]
    cos, sin = cos[..., :half], sin[..., :half]
    return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)


class MLAttention(nn.Module):
    """DeepSeek-V2's attention; parameter names are the checkpoint's (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config.hf_config
        dtype = config.dtype
        bias = bool(getattr(c, "attention_bias", False))
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = int(c.kv_lora_rank)
        self.nope_dim, self.rope_dim = int(c.qk_nope_head_dim), int(c.qk_rope_head_dim)
        self.v_head_dim = int(c.v_head_dim)
        self.scale = mla_softmax_scale(c)
        hidden, heads, qk_dim = config.hidden_size, self.num_heads, self.nope_dim + self.rope_dim
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False, dtype=dtype)
        else:
            self.q_a_proj = nn.Linear(hidden, int(c.q_lora_rank), bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(int(c.q_lora_rank), LATENT_NORM_EPS, dtype)
            self.q_b_proj = nn.Linear(int(c.q_lora_rank), heads * qk_dim, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, heads * (self.nope_dim + self.v_head_dim), bias=False, dtype=dtype
        )
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=bias, dtype=dtype)

    def project_q(self, hidden: torch.Tensor) -> torch.Tensor:
        """q [T, H, nope + rope] before rope."""
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        return q.view(hidden.shape[0], self.num_heads, self.nope_dim + self.rope_dim)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, r] and W_UV [H, v, r]: kv_b_proj's rows per head, key rows then value rows."""
        per_head = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, -1)
        w_uk, w_uv = per_head.split([self.nope_dim, self.v_head_dim], dim=1)
        return w_uk, w_uv

    def forward(
        self, hidden: torch.Tensor, batch: ForwardBatch, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        q_nope, q_pe = self.project_q(hidden).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = apply_interleaved_rotary(q_pe, k_pe.unsqueeze(1), cos_sin)
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        q = torch.cat((q_latent, q_pe), dim=-1)
        kv = torch.cat((latent.unsqueeze(1), k_pe), dim=-1)  # [T, 1, r + rope]: the stored vector
        out = batch.attn_backend.attend(self.layer_id, q, kv, kv, batch, self.scale)
        out = torch.einsum("thr,hvr->thv", out[..., : self.kv_lora_rank], w_uv)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.v_head_dim))
