"""A model directory for serving benchmarks with dummy weights: a config plus a synthetic tokenizer.

    python -m pdserve.bench.synthetic_model_dir --config bench/configs/llama-3.1-8b.json --out /tmp/llama8b
    serve --model-path /tmp/llama8b --load-format dummy --device cuda

The GPU machines reach no model hub, so there is no real Llama tokenizer to serve with. The
router, `bench_serving` and the OpenAI routes still need one that covers every id the model can
emit: this writes a word-level tokenizer whose token i is the word `w<i>` (ids that are special in
the config, bos and eos, get `<|bos|>`-style names), with a ChatML template. Decoding joins words
with spaces, so text length grows with the token count as with a real tokenizer, and encoding
the decoded text gives the ids back exactly. Ids 1 to 21 are JSON's pieces (`{`, `"`, digits, ...)
so that a JSON schema's grammar has tokens to choose (the constrained-decoding benchmark).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + message['content']"
    " + ' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)

_JSON_PIECES = ["{", "}", "[", "]", ":", ",", '"', "true", "false", "null", "-", *"0123456789"]


def write_model_dir(config_path: str, out: str) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = json.loads(Path(config_path).read_text())
    vocab_size = int(config["vocab_size"])
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    bos = config.get("bos_token_id")
    names = {i: f"w{i}" for i in range(vocab_size)}
    names.update(enumerate(_JSON_PIECES, start=1))
    if bos is not None:
        names[bos] = "<|bos|>"
    for n, i in enumerate(eos_ids):
        names[i] = "<|eos|>" if n == 0 else f"<|eos{n}|>"
    # ChatML markers: the two highest ids that are not special already
    free = [i for i in range(vocab_size - 1, -1, -1) if names[i].startswith("w")][:2]
    names[free[0]], names[free[1]] = "<|im_start|>", "<|im_end|>"
    vocab = {name: i for i, name in names.items()}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names[eos_ids[0]] if eos_ids else "w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    specials = [n for n in names.values() if n.startswith("<|")]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=names[bos] if bos is not None else None,
        eos_token=names[eos_ids[0]] if eos_ids else None,
        model_max_length=int(config.get("max_position_embeddings", 8192)),
    )
    tokenizer.chat_template = _CHATML
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, out_dir / "config.json")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv)
    print(write_model_dir(ns.config, ns.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
