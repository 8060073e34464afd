"""JSON Schemas (OpenAPI 3.1 dialect) of the router's request bodies, built from the request models.

    schemas = component_schemas()          # {"SamplingParams": {...}, "GenerateRequest": {...}, ...}
    schemas["SamplingParams"]["properties"]["top_k"]   # {"type": "integer", "default": 1073741824}
    type_schema(list[int] | None)          # {"anyOf": [{"type": "array", ...}, {"type": "null"}]}

What comes from where (so the document follows the code it describes):
- `SamplingParams`: every field of shared/engine/sampling_params.py's dataclass, its type hint and
  default; `stop`/`stop_regex` also take a string and the list fields `null` (what `from_dict` accepts).
- `GenerateRequest` (/generate): the per-prompt fields are GenerateInput's (router/serving/generator_api.py)
  type hints, each as "one value or a list with one value per prompt" (router/native/parse.py's
  rule); the fields it refuses are router/native/parse.py's UNSUPPORTED_FIELDS. `text`/`input_ids` are written
  here (their batch forms are the parser's, not a dataclass's).
- `CompletionRequest` / `ChatCompletionRequest`: the sampling fields are router/openai/params.py's
  SAMPLING_FIELDS with SamplingParams' types; fields whose parsed type is their wire type come from
  router/openai/protocol.py's dataclasses of the same name; `stream_options` from StreamOptions;
  message roles from chat_template.ROLES. The rest (`prompt`, `messages`, `n`, `seed`, ...) is the
  small `_WIRE_FIELDS` table below.
- Ranges are not in the schemas: values are checked by the parsers, which answer 400 naming the field.
Unknown fields are allowed (`additionalProperties` is left open) because the parsers ignore them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pdserve.router.native.parse import UNSUPPORTED_FIELDS
from pdserve.router.openai.chat_template import ROLES
from pdserve.router.openai.params import CONSTRAINED_FIELDS, SAMPLING_FIELDS
from pdserve.router.openai.protocol import ChatRequest, CompletionRequest, StreamOptions
from pdserve.router.serving.generator_api import GenerateInput
from pdserve.shared.engine.sampling_params import SamplingParams

_SCALARS = {int: "integer", float: "number", bool: "boolean", str: "string"}
# /generate's fields that take one value for every prompt or a list of one per prompt (router/native/parse.py)
PER_PROMPT_FIELDS = ("rid", "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob")


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of a Python type hint (scalars, list, dict, unions, Any, dataclasses)."""
    if hint is Any or hint is object:
        return {}
    if hint is type(None):
        return {"type": "null"}
    if hint in _SCALARS:
        schema: dict[str, Any] = {"type": _SCALARS[hint]}
        return {"type": ["number", "integer"]} if hint is float else schema  # JSON 1 is a valid float
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_schema(a) for a in args]}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1]) if args else {}}
    if dataclasses.is_dataclass(hint):
        return object_schema(dataclass_properties(hint))
    raise TypeError(f"no JSON Schema for type hint {hint!r}")


def dataclass_properties(cls: type, names: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Property schemas of `cls`'s fields (all, or `names` in that order), with JSON defaults."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name in names or tuple(by_name):
        schema = type_schema(hints[name])
        default = _default(by_name[name])
        if default is not dataclasses.MISSING:
            schema["default"] = default
        out[name] = schema
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def object_schema(properties: dict[str, Any], required: tuple[str, ...] = (), description: str = "") -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return schema if _accepts_null(schema) else {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def sampling_params_schema() -> dict[str, Any]:
    props = dataclass_properties(SamplingParams)
    for name in ("stop", "stop_regex"):  # from_dict takes one string as a list of one
        props[name] = {"anyOf": [{"type": "string"}, props[name], {"type": "null"}], "default": []}
    props["stop_token_ids"] = _nullable(props["stop_token_ids"]) | {"default": []}
    return object_schema(
        props,
        description="SGLang's sampling parameters; an unknown name or a value out of range is a 400 naming it.",
    ) | {"additionalProperties": False}  # SamplingParams.from_dict refuses unknown names


def _per_prompt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "array", "items": _nullable(schema)}]}


def generate_schema() -> dict[str, Any]:
    ids = {"type": "array", "items": {"type": "integer"}}
    hints = dataclass_properties(GenerateInput, (*PER_PROMPT_FIELDS, "return_text_in_logprobs"))
    props: dict[str, Any] = {
        "text": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
        },
        "input_ids": {"anyOf": [ids, {"type": "array", "items": ids, "minItems": 1}]},
        "sampling_params": _per_prompt(_ref("SamplingParams")),
        **{name: _per_prompt(_strip_default(hints[name])) for name in PER_PROMPT_FIELDS},
        "return_text_in_logprobs": hints["return_text_in_logprobs"],
        "stream": {"type": "boolean", "default": False},
    }
    for name, what in UNSUPPORTED_FIELDS.items():
        props[name] = {"description": f"Not supported ({what}): 400 when set."}
    return object_schema(
        props,
        description="SGLang's GenerateReqInput: exactly one of text and input_ids; a list of them is a batch.",
    )


def _strip_default(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != "default"}


def _sampling_properties() -> dict[str, Any]:
    """OpenAI's sampling fields (params.SAMPLING_FIELDS) with the types of the SamplingParams they set."""
    hints = dataclass_properties(SamplingParams)
    return {wire: _nullable(_strip_default(hints[name])) for wire, name in SAMPLING_FIELDS.items()}


def _constrained_properties() -> dict[str, Any]:
    hints = dataclass_properties(SamplingParams, CONSTRAINED_FIELDS)
    return {
        name: _nullable(_strip_default(hints[name]))
        | {"description": "Constrained decoding: a grammar source (structural_tag: its object as JSON)."}
        for name in CONSTRAINED_FIELDS
    }


def _response_format_schema() -> dict[str, Any]:
    """OpenAI's response_format and SGLang's structural_tag forms (router/openai/response_format.py)."""
    structure = object_schema(
        {"begin": {"type": "string"}, "schema": {"type": "object"}, "end": {"type": "string"}},
        ("begin", "schema", "end"),
    )
    props = {
        "type": {"enum": ["text", "json_object", "json_schema", "structural_tag"]},
        "json_schema": {"type": "object", "description": "json_schema: {name, schema, strict}."},
        "structures": {"type": "array", "items": structure, "description": "structural_tag (with triggers)."},
        "triggers": {"type": "array", "items": {"type": "string"}},
        "format": {"type": "object", "description": "structural_tag: one of xgrammar's formats."},
    }
    return object_schema(props, ("type",))


# Fields of both OpenAI requests whose wire type no dataclass holds (protocol.py parses them).
_PROMPT = str | list[str] | list[int] | list[list[int]]
_WIRE_FIELDS: dict[str, Any] = {
    "n": int | None,
    "seed": int | None,
    "min_tokens": int | None,
    "stop": str | list[str] | None,
    "stream": bool | None,
    "user": str | None,
}


def _openai_common() -> dict[str, Any]:
    stream_options = dataclass_properties(StreamOptions, ("include_usage", "continuous_usage_stats"))
    return {
        **{name: type_schema(hint) for name, hint in _WIRE_FIELDS.items()},
        **_sampling_properties(),
        "stream_options": _nullable(object_schema(stream_options)),
        **_constrained_properties(),
        "response_format": _nullable(_response_format_schema()),
    }


def completion_schema() -> dict[str, Any]:
    props = {
        "prompt": type_schema(_PROMPT),
        **_nullable_all(dataclass_properties(CompletionRequest, ("model", "max_tokens", "logprobs", "echo"))),
        "rid": type_schema(str | list[str] | None),
        "best_of": type_schema(int | None),
        "suffix": type_schema(str | None) | {"description": "Not supported: 400 when set."},
        **_openai_common(),
    }
    return object_schema(props, required=("prompt",), description="OpenAI's completion request.")


def chat_schema() -> dict[str, Any]:
    content_part = object_schema({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"))
    message = object_schema(
        {
            "role": {"enum": list(ROLES)},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": content_part}, {"type": "null"}]
            },
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "description": "An assistant's calls, replayed."},
            "tool_call_id": {"type": "string", "description": "The call a tool message answers."},
        },
        required=("role",),
    )
    names = ("model", "max_tokens", "logprobs", "top_logprobs", "add_generation_prompt")
    names += ("continue_final_message", "chat_template_kwargs", "rid")
    props = {
        "messages": {"type": "array", "items": message, "minItems": 1},
        **_nullable_all(dataclass_properties(ChatRequest, names)),
        "max_completion_tokens": type_schema(int | None),
        "tools": {"type": "array", "description": "Function tools: {'type': 'function', 'function': {...}}."},
        "tool_choice": {
            "description": "'auto', 'none', 'required' or {'type': 'function', 'function': {'name'}}."
        },
        "parallel_tool_calls": type_schema(bool | None),
        "separate_reasoning": type_schema(bool | None),
        **_openai_common(),
    }
    return object_schema(props, required=("messages",), description="OpenAI's chat completion request.")


def _nullable_all(props: dict[str, Any]) -> dict[str, Any]:
    # protocol.py reads every OpenAI field with "null means the default"
    return {n: _nullable(_strip_default(s)) | _only_default(s) for n, s in props.items()}


def _accepts_null(schema: dict[str, Any]) -> bool:
    return any(s.get("type") == "null" for s in schema.get("anyOf", ()))


def _only_default(schema: dict[str, Any]) -> dict[str, Any]:
    return {"default": schema["default"]} if "default" in schema else {}


def error_schema() -> dict[str, Any]:
    return object_schema(
        {
            "object": {"const": "error"},
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": "integer"},
        },
        required=("object", "message", "type", "code"),
        description="Every refusal of the router (router/http/errors.py), native routes included.",
    )


def component_schemas() -> dict[str, dict[str, Any]]:
    """Every named schema of the document (referenced as #/components/schemas/<name>)."""
    return {
        "SamplingParams": sampling_params_schema(),
        "GenerateRequest": generate_schema(),
        "CompletionRequest": completion_schema(),
        "ChatCompletionRequest": chat_schema(),
        "EmbeddingRequest": object_schema(
            {
                "input": type_schema(_PROMPT),
                "model": {"type": "string"},
                "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
                "dimensions": {"type": "integer"},
            },
            required=("input",),
            description="OpenAI's embedding request (an embedding model; a generation model answers 400).",
        ),
        "EncodeRequest": object_schema(
            {"text": type_schema(_PROMPT), "input_ids": type_schema(_PROMPT), "rid": {"type": "string"}},
            description="SGLang's /encode: text or input_ids (an embedding model; a generation model answers 400).",
        ),
        "ErrorResponse": error_schema(),
        **control_schemas(),
    }


def control_schemas() -> dict[str, dict[str, Any]]:
    """Bodies of the tokenizer and control routes. Their handlers read fields one by one (no request
    dataclass), so these are written here from the handlers' reads."""
    ids = {"type": "array", "items": {"type": "integer"}}
    return {
        "TokenizeRequest": object_schema(
            {
                "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                "add_special_tokens": {"type": "boolean", "default": True},
            }
        ),
        "DetokenizeRequest": object_schema(
            {
                "tokens": {"anyOf": [ids, {"type": "array", "items": ids}]},
                "skip_special_tokens": {"type": "boolean", "default": True},
            },
            required=("tokens",),
        ),
        "AbortRequest": object_schema(
            {"rid": {"type": "string"}, "abort_all": {"type": "boolean", "default": False}},
            description="Give rid, or abort_all true.",
        ),
        "UpdateWeightsFromDiskRequest": object_schema(
            {
                "model_path": {"type": "string"},
                "load_format": type_schema(str | None),
                "weight_version": type_schema(str | None),
            },
            required=("model_path",),
        ),
        "SeparateReasoningRequest": object_schema(
            {"text": {"type": "string"}, "reasoning_parser": {"enum": ["qwen3", "deepseek-r1"]}},
            required=("text", "reasoning_parser"),
        ),
        "ParseFunctionCallRequest": object_schema(
            {
                "text": {"type": "string"},
                "tool_call_parser": {"type": "string"},
                "tools": {"type": "array", "items": {"type": "object"}},
            },
            required=("text", "tool_call_parser"),
        ),
    }
