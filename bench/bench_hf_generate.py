"""The anchor: Hugging Face `generate` on the same GPU, same model config, same prompt shapes.

    python -m pdserve.bench.bench_hf_generate --batch-size 1 64 --input-len 1024 --output-len 256

Random bf16 weights from the config (as `--load-format dummy` does for pdserve), random prompt ids,
`min_new_tokens = max_new_tokens` so every row generates exactly output_len tokens. Per batch size:
the time of a 1-token generate (prefill) and of the full generate; ms per decode step =
(full - prefill) / (output_len - 1); output tok/s = batch * output_len / full. Default
attention (sdpa) and cache, as a user who calls `generate` gets them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "llama-3.1-8b.json")


def _timed_generate(model, ids: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=DEFAULT_CONFIG, help="a config .json or a directory with one")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--result-filename", default=None)
    ns = p.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ns.model_path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for bs in ns.batch_size:
        ids = torch.randint(0, config.vocab_size, (bs, ns.input_len), device="cuda", generator=gen)
        _timed_generate(model, ids[:, :64], 4)  # warm-up
        prefill_s = _timed_generate(model, ids, 1)
        full_s = _timed_generate(model, ids, ns.output_len)
        row = {
            "batch_size": bs,
            "input_len": ns.input_len,
            "output_len": ns.output_len,
            "prefill_s": prefill_s,
            "total_s": full_s,
            "ms_per_step": (full_s - prefill_s) / (ns.output_len - 1) * 1e3,
            "output_tok_s": bs * ns.output_len / full_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if ns.result_filename:
            with open(ns.result_filename, "a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    print("| HF generate bs | in | out | ms/step | output tok/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['input_len']} | {r['output_len']} | {r['ms_per_step']:.2f} | "
            f"{r['output_tok_s']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
