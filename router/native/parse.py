"""The body of `/generate` (SGLang's GenerateReqInput) turned into one GenerateInput per prompt.

Rules, as SGLang has them:
- exactly one of `text` (a string, or a list of strings: a batch) and `input_ids` (a list of ids,
  or a list of such lists: a batch);
- per-prompt fields (`sampling_params`, `rid`, `return_logprob`, `logprob_start_len`,
  `top_logprobs_num`, `token_ids_logprob`) take one value for all prompts or a list with one
  value per prompt;
- `sampling_params.n` > 1 makes the response a list even for one prompt: prompt i's samples come
  at positions i*n .. i*n+n-1 (every prompt of a batch must ask for the same n);
- fields of GenerateReqInput that pdserve does not serve (images, audio, LoRA, embeddings as
  input, ...) are refused with 400 when set; other unknown top-level fields are ignored, as
  SGLang's request model ignores them;
- types are checked here (400 naming the field), and the sizes of `sampling_params.stop` and
  `stop_token_ids` (router/text/stop_strings.py's limits); values against the model are checked by the
  text generator.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pdserve.router.http.limits import check_batch_size, http_error
from pdserve.router.serving.generator_api import GenerateInput
from pdserve.router.text.stop_strings import StopLimitError, check_stop_limits
from pdserve.router.text.tokenizer_fast import Encoder

# GenerateReqInput fields pdserve does not serve: set (not null, not empty) they are a 400.
UNSUPPORTED_FIELDS = {
    "image_data": "image input (the served model has no image understanding)",
    "video_data": "video input (the served model has no video understanding)",
    "audio_data": "audio input (the served model has no audio understanding)",
    "input_embeds": "input_embeds",
    "lora_path": "LoRA adapters",
    "lora_id": "LoRA adapters",
    "custom_logit_processor": "custom logit processors",
    "return_hidden_states": "return_hidden_states",
    "session_params": "session_params",
}


@dataclass
class NativeGenerateRequest:
    inputs: list[GenerateInput]  # one per prompt
    is_batch: bool  # the response is a list
    num_samples: int  # n
    stream: bool


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_id_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(t) for t in x)


def _per_prompt(body: dict[str, Any], name: str, count: int, default: Any, is_single: Any) -> list[Any]:
    """The field's value for each prompt: one value for all, or a list of `count` values."""
    value = body.get(name)
    if value is None:
        return [default] * count
    if is_single(value):
        return [value] * count
    if isinstance(value, list) and len(value) == count and all(v is None or is_single(v) for v in value):
        return [default if v is None else v for v in value]
    raise http_error(400, f"{name} has the wrong type or length for {count} prompt(s): {value!r:.200}")


def parse_generate(body: dict[str, Any], encode: Encoder, max_batch_size: int) -> NativeGenerateRequest:
    """`encode` turns a text prompt into ids (special tokens added, as `tokenizer.encode` does)."""
    for name, what in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in (None, [], {}, False):
            raise http_error(400, f"pdserve does not support {what} (field {name}).")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise http_error(400, "Either text or input_ids should be provided (exactly one of them).")
    if text is not None:
        if isinstance(text, str):
            is_batch, texts = False, [text]
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            is_batch, texts = True, text
        else:
            raise http_error(400, "text must be a string or a non-empty list of strings.")
        check_batch_size(len(texts), max_batch_size)
        prompts = [encode(t) for t in texts]
    elif _is_id_list(input_ids):
        is_batch, prompts = False, [input_ids]
    elif isinstance(input_ids, list) and input_ids and all(_is_id_list(p) for p in input_ids):
        is_batch, prompts = True, input_ids
        check_batch_size(len(prompts), max_batch_size)
    else:
        raise http_error(400, "input_ids must be a list of token ids or a non-empty list of such lists.")
    count = len(prompts)

    params_list = _per_prompt(body, "sampling_params", count, {}, lambda v: isinstance(v, dict))
    for params in {id(p): p for p in params_list}.values():  # one shared dict is checked once
        try:
            check_stop_limits(params.get("stop"), params.get("stop_token_ids"))
        except StopLimitError as exc:
            raise http_error(400, f"sampling_params.{exc.message}") from None
    rids = _per_prompt(body, "rid", count, None, lambda v: isinstance(v, str))
    if body.get("rid") is not None and len(set(rids)) != count:
        raise http_error(400, "rid must be a list of distinct strings for a batch.")
    return_logprob = _per_prompt(body, "return_logprob", count, False, lambda v: isinstance(v, bool))
    start_len = _per_prompt(body, "logprob_start_len", count, -1, _is_int)
    top_num = _per_prompt(body, "top_logprobs_num", count, 0, _is_int)
    ids_logprob = _per_prompt(body, "token_ids_logprob", count, None, _is_id_list)
    text_in_logprobs = body.get("return_text_in_logprobs", False)
    if not isinstance(text_in_logprobs, bool):
        raise http_error(400, "return_text_in_logprobs must be a boolean.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise http_error(400, "stream must be a boolean.")

    ns = {_sample_count(p) for p in params_list}
    if len(ns) != 1:
        raise http_error(400, "Every prompt of a batch must ask for the same n.")
    num_samples = ns.pop()
    if count * num_samples > max_batch_size:
        raise http_error(
            400,
            f"The request asks for {count * num_samples} samples ({count} prompt(s) x n={num_samples}), "
            f"more than --max-batch-size {max_batch_size}.",
        )
    if num_samples > 1:
        is_batch = True
    inputs = [
        GenerateInput(
            rid=rids[i] if rids[i] is not None else uuid.uuid4().hex,
            input_ids=list(prompts[i]),
            sampling_params=dict(params_list[i]),
            return_logprob=return_logprob[i],
            top_logprobs_num=top_num[i],
            logprob_start_len=start_len[i],
            token_ids_logprob=ids_logprob[i],
            return_text_in_logprobs=text_in_logprobs,
        )
        for i in range(count)
    ]
    return NativeGenerateRequest(inputs=inputs, is_batch=is_batch, num_samples=num_samples, stream=stream)


def _sample_count(params: dict[str, Any]) -> int:
    n = params.get("n", 1)
    if n is None:
        return 1
    if not _is_int(n) or n < 1:
        raise http_error(400, f"n must be an integer >= 1, got {n!r}.")
    return n
