"""A tiny Llama whose greedy output is written in advance: the model, not a stand-in, is scripted.

`make_scripted_model(dir, scripts)` writes a checkpoint (tests/helpers/tiny_models.py's byte-level
tokenizer plus one added token per script piece) whose greedy continuation of a prompt ending in
a script's trigger is that script's pieces, one token each, then EOS (<|im_end|>).

How: every layer's output projections (attention o_proj, MLP down_proj) are zero, so the last
hidden state is the current token's embedding; each piece's embedding is its own unit vector, and
lm_head maps that vector to the next piece (or EOS). The next token thus depends on the current
one only, which is why every piece of every script must be a distinct token.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from tests.helpers.tiny_models import IM_END_ID, make_tiny_model, tiny_config

LOGIT = 20.0  # the successor's logit (after RMSNorm scales the unit vector by sqrt(hidden))


def make_scripted_model(dir: Path, scripts: dict[str, list[str]]) -> Path:
    """`scripts`: trigger -> the pieces the model writes after it."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaForCausalLM

    dir = make_tiny_model("llama", Path(dir))
    tokenizer = AutoTokenizer.from_pretrained(str(dir))
    pieces = [p for trigger, script in scripts.items() for p in (trigger, *script)]
    assert len(set(pieces)) == len(pieces), "every piece must be its own token"
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    tokenizer.save_pretrained(str(dir))
    config = tiny_config("llama")
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.tie_word_embeddings = False
    assert len(pieces) <= config.hidden_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        slot = 0
        for trigger, script in scripts.items():
            ids = [tokenizer.convert_tokens_to_ids(p) for p in (trigger, *script)] + [IM_END_ID]
            for current, following in itertools.pairwise(ids):
                emb[current].zero_()
                emb[current, slot] = 1.0
                head[following, slot] = LOGIT
                slot += 1
    model.generation_config.eos_token_id = [IM_END_ID]  # as make_tiny_model's generation_config.json
    model.save_pretrained(str(dir), safe_serialization=True)
    return dir
