"""Hugging Face transformers as the oracle: greedy generation and raw-logit logprobs in float32."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from pdserve.shared.models.config import ModelConfig


@torch.inference_mode()
def hf_greedy(
    model_dir: str, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """For each prompt alone: (generated ids, logprob of each generated id under log_softmax of the raw
    logits). Stops on the same eos ids the engine uses (config ∪ generation_config)."""
    eos = sorted(ModelConfig.from_path(model_dir).eos_token_ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
            output_logits=True,
            return_dict_in_generate=True,
            # neutralise any sampling defaults a generation_config.json may carry
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=None,
        )
        new = out.sequences[0, len(prompt) :].tolist()
        lps = [torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(out.logits, new)]
        results.append((new, lps))
    return results
