"""Tiny random Hugging Face checkpoints of each supported architecture, for fast parity tests.

`make_tiny_model(kind, dir)` writes a safetensors checkpoint (float32) with config.json,
generation_config.json and a byte-level tokenizer (ChatML template) into `dir` and returns it.
Weights come from a fixed seed, so two calls give identical files. Every weight, bias and norm is
random (HF would init biases to 0 and norms to 1, which would hide a bias or norm applied wrongly),
with std 0.1 so logits are spread enough for greedy parity.

Kinds:
- llama:   GQA 4/2, head_dim 16, 3 layers, llama3 rope scaling that affects short sequences
           (original context 64), untied lm_head;
- mistral: GQA 8/4, head_dim 8, 2 layers, no sliding window;
- qwen2:   MQA 4/1, q/k/v biases, tied embeddings;
- qwen3:   GQA 4/2, explicit head_dim 32 (!= hidden/heads), q/k norms, untied.
- mistral_swa: mistral with a sliding window of 8 (shorter than most test prompts);
- qwen2_swa: qwen2 with `use_sliding_window`, a window of 8 from layer 1 on (`max_window_layers` 1);
- gemma:   MQA 4/1, head_dim 32, GeGLU, (1 + w) norms, tied embeddings scaled by sqrt(hidden);
- gemma2:  GQA 4/2, 3 layers (sliding window 8 on layers 0 and 2), query_pre_attn_scalar 24,
           attention and final logit soft-capping small enough to change results (2 and 5);
- phi3:    GQA 4/2, fused qkv/gate_up in the checkpoint, sliding window 12, untied.
MoE kinds (MOE_KINDS; 8 experts of 32, top 2):
- qwen2_moe:        3 sparse layers, shared expert of 48, norm_topk_prob False, untied;
- qwen2_moe_sparse: 4 layers, decoder_sparse_step 2 and mlp_only_layers [3] (only layer 1 is
                    sparse), norm_topk_prob True, tied embeddings;
- mixtral:          GQA 4/2, 2 layers, untied.
DeepSeek-V2 kinds (MLA + DeepSeek MoE): tests/helpers/tiny_deepseek.py (DEEPSEEK_KINDS).
Vocabulary 512: ids 0-255 are bytes, 256 <|endoftext|> (config eos), 257 <|im_start|>,
258 <|im_end|> (generation_config eos); the rest are never produced by the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_KINDS = ("llama", "mistral", "qwen2", "qwen3", "mistral_swa", "qwen2_swa", "gemma", "gemma2", "phi3")
MOE_KINDS = ("qwen2_moe", "qwen2_moe_sparse", "mixtral")
VOCAB_SIZE = 512
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 256, 257, 258
WEIGHT_STD = 0.1
_SEED = 1234

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "bos_token_id": IM_START_ID,
    "eos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
}


def tiny_config(kind: str):  # -> a transformers PretrainedConfig
    """The Hugging Face config of a tiny model of `kind` (see the module docstring)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if kind in _FAMILY_CONFIGS:
        return _FAMILY_CONFIGS[kind]()
    if kind == "llama":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(
            **_COMMON,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            rope_scaling=rope,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
    if kind == "mistral":
        return MistralConfig(
            **_COMMON,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            sliding_window=None,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            architectures=["MistralForCausalLM"],
        )
    if kind == "qwen2":
        return Qwen2Config(
            **_COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            architectures=["Qwen2ForCausalLM"],
        )
    if kind == "qwen3":
        return Qwen3Config(
            **_COMMON,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_theta=1000000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            architectures=["Qwen3ForCausalLM"],
        )
    if kind in MOE_KINDS:
        return _tiny_moe_config(kind)
    if kind.startswith("deepseek"):  # tests/helpers/tiny_deepseek.py
        from tests.helpers.tiny_deepseek import deepseek_config

        return deepseek_config(kind, _COMMON)
    raise ValueError(f"unknown tiny model kind {kind!r}; kinds: {TINY_KINDS + MOE_KINDS}")


def _tiny_moe_config(kind: str):  # -> a transformers PretrainedConfig
    from transformers import MixtralConfig, Qwen2MoeConfig

    moe = {
        "num_experts_per_tok": 2,
        "rope_theta": 10000.0,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if kind == "mixtral":
        common = {**_COMMON, "intermediate_size": 32}
        return MixtralConfig(
            **common,
            **moe,
            num_hidden_layers=2,
            num_local_experts=8,
            sliding_window=None,
            tie_word_embeddings=False,
            architectures=["MixtralForCausalLM"],
        )
    sparse = kind == "qwen2_moe_sparse"
    return Qwen2MoeConfig(
        **_COMMON,
        **moe,
        num_hidden_layers=4 if sparse else 3,
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=sparse,
        decoder_sparse_step=2 if sparse else 1,
        mlp_only_layers=[3] if sparse else [],
        use_sliding_window=False,
        tie_word_embeddings=sparse,
        architectures=["Qwen2MoeForCausalLM"],
    )


def _mistral_swa():
    config = tiny_config("mistral")
    config.sliding_window = 8
    return config


def _qwen2_swa():
    from transformers import Qwen2Config

    fields = tiny_config("qwen2").to_dict()
    fields.pop("layer_types", None)  # recomputed from the window fields below
    return Qwen2Config(**{**fields, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})


def _gemma():
    from transformers import GemmaConfig

    return GemmaConfig(
        **_COMMON,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        hidden_act="gelu_pytorch_tanh",
        rope_theta=10000.0,
        tie_word_embeddings=True,
        architectures=["GemmaForCausalLM"],
    )


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(
        **_COMMON,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        architectures=["Gemma2ForCausalLM"],
    )


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(
        **_COMMON,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=12,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        architectures=["Phi3ForCausalLM"],
    )


_FAMILY_CONFIGS = {
    "mistral_swa": _mistral_swa,
    "qwen2_swa": _qwen2_swa,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi3": _phi3,
}


def _byte_tokenizer():  # -> a transformers PreTrainedTokenizerFast
    """Byte-level BPE without merges: one token per byte, plus the three special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> printable char table, so byte b is token b.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    assert set(vocab) == set(byte_chars)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        ENDOFTEXT_ID,
        IM_START_ID,
        IM_END_ID,
    ]
    tokenizer.chat_template = _CHATML
    return tokenizer


@torch.no_grad()
def make_tiny_model(kind: str, dir: Path) -> Path:
    """Writes the tiny `kind` checkpoint (weights, configs, tokenizer) into `dir`; returns `dir`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(kind)
    torch.manual_seed(_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(_SEED)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * WEIGHT_STD
        param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(str(dir), safe_serialization=True)
    GenerationConfig(
        bos_token_id=IM_START_ID, eos_token_id=[IM_END_ID], pad_token_id=ENDOFTEXT_ID
    ).save_pretrained(str(dir))
    _byte_tokenizer().save_pretrained(str(dir))
    return dir
