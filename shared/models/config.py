"""What the engine needs to know about a model, read from its Hugging Face config without weights.

Rules:
- `ModelConfig.from_path` reads `config.json` (a directory, or a config .json file for dummy weights)
  and, when present, `generation_config.json`; it never touches weight files.
- `dtype="auto"` is the checkpoint's dtype on CUDA and float32 on CPU (CPU kernels and the parity
  tests want float32); an absent checkpoint dtype counts as float32.
- `eos_token_ids` is the union of the config's eos ids and generation_config.json's: chat models often
  put their end-of-turn token (e.g. <|im_end|>, <|eot_id|>) only in the latter.
- `context_length` overrides `max_position_embeddings` when given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from pdserve.shared.models.rope import RopeConfig

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(
    dtype: str | torch.dtype, checkpoint_dtype: Any, device: str | torch.device, model_type: str = ""
) -> torch.dtype:
    """The torch dtype for `dtype` (a name, an alias or "auto") on `device`.

    "auto" means float32 off CUDA; on CUDA the checkpoint's dtype, except that a float32 (or
    unstated) one runs in 16 bits as SGLang and vLLM run it: bfloat16 for the Gemma families
    (their activations overflow float16), float16 for the others. Half the bytes of every step.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.lower()
    if name != "auto":
        if name not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPE_ALIASES)}")
        return _DTYPE_ALIASES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPE_ALIASES.get(checkpoint_dtype.replace("torch.", "").lower())
    if isinstance(checkpoint_dtype, torch.dtype) and checkpoint_dtype != torch.float32:
        return checkpoint_dtype
    return torch.bfloat16 if model_type.startswith("gemma") else torch.float16


def _id_set(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset((value,))
    return frozenset(int(v) for v in value)


def _generation_eos(local_dir: Path | None) -> frozenset[int]:
    """eos ids of generation_config.json next to the config; empty when there is none."""
    if local_dir is None or not local_dir.is_dir():
        return frozenset()
    path = local_dir / "generation_config.json"
    if not path.is_file():
        return frozenset()
    try:
        return _id_set(json.loads(path.read_text()).get("eos_token_id"))
    except (ValueError, TypeError):
        return frozenset()


def _load_hf_config(path: Path, trust_remote_code: bool) -> PretrainedConfig:
    if path.is_file():
        # A bare config .json (bench/configs/*.json): no repository around it.
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


@dataclass
class ModelConfig:
    architectures: list[str]
    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    dtype: torch.dtype
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: RopeConfig
    eos_token_ids: frozenset[int]
    hf_config: PretrainedConfig = field(repr=False)
    # Mixture of experts (0 for dense models): routed experts per MoE layer, experts per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # KV planes per layer in the pool: 2 (K and V); 1 where a model reads V out of its stored K
    # (MLA: one latent vector per token, num_kv_heads 1 and head_dim kv_lora_rank + qk_rope_head_dim).
    kv_planes: int = 2

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @staticmethod
    def from_path(
        local_dir: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        context_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> ModelConfig:
        """Reads `local_dir/config.json` (or the .json file `local_dir`) and generation_config.json."""
        path = Path(local_dir)
        hf_config = _load_hf_config(path, trust_remote_code)
        config = ModelConfig.from_hf_config(
            hf_config, dtype=dtype, device=device, context_length=context_length
        )
        config.eos_token_ids = config.eos_token_ids | _generation_eos(path if path.is_dir() else None)
        return config

    @staticmethod
    def from_hf_config(
        hf_config: PretrainedConfig,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        context_length: int | None = None,
    ) -> ModelConfig:
        """Builds the config from an in-memory Hugging Face config (no generation_config.json)."""
        c = hf_config
        heads = int(c.num_attention_heads)
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        max_pos = (
            getattr(c, "max_position_embeddings", None)
            or getattr(c, "n_positions", None)
            or getattr(c, "seq_length", None)
            or 2048
        )
        checkpoint_dtype = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
        kv_planes = 2
        if getattr(c, "kv_lora_rank", None):  # MLA (DeepSeek-V2): the pool holds the compressed KV
            kv_heads, head_dim, kv_planes = 1, int(c.kv_lora_rank) + int(c.qk_rope_head_dim), 1
        return ModelConfig(
            architectures=list(getattr(c, "architectures", None) or []),
            model_type=c.model_type,
            hidden_size=int(c.hidden_size),
            num_layers=int(c.num_hidden_layers),
            num_attention_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=int(getattr(c, "intermediate_size", 4 * c.hidden_size)),
            vocab_size=int(c.vocab_size),
            context_length=int(context_length or max_pos),
            dtype=resolve_dtype(dtype, checkpoint_dtype, device, c.model_type),
            rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            rope=RopeConfig.from_hf_config(c),
            eos_token_ids=_id_set(getattr(c, "eos_token_id", None)),
            hf_config=hf_config,
            num_experts=int(getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or 0),
            num_experts_per_tok=int(getattr(c, "num_experts_per_tok", None) or 0),
            kv_planes=kv_planes,
        )
