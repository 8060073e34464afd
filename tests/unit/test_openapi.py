"""The router's OpenAPI document: every registered route is in it, it is valid OpenAPI 3.1, its
schemas follow the request models, and /openapi.json and /docs are served without an API key."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from pdserve.router.app import build_app
from pdserve.router.openapi.document import openapi_document, registered_routes
from pdserve.router.openapi.schemas import type_schema
from pdserve.router.state import RouterArgs
from pdserve.shared.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def app():
    return build_app(RouterArgs(worker_addrs=[]))


@pytest.fixture(scope="module")
def document(app):
    return openapi_document(app)


def test_document_is_valid_openapi_3_1(document):
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises on an invalid document


def test_every_registered_route_and_method_is_listed(app, document):
    routes = registered_routes(app)
    assert len(routes) > 80  # the native, control, OpenAI and SageMaker routes
    for pattern, method, _ in routes:
        path = pattern.replace("{model:.+}", "{model}")
        assert method.lower() in document["paths"][path], (method, path)
    listed = {(p, m) for p, ops in document["paths"].items() for m in ops}
    assert len(listed) == len(routes)  # nothing listed that is not registered


def test_main_routes_have_bodies_and_error_shape(document):
    paths = document["paths"]
    for path, schema in [
        ("/generate", "GenerateRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/embeddings", "EmbeddingRequest"),
    ]:
        op = paths[path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{schema}"
        error = op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
        assert error == "#/components/schemas/ErrorResponse"
    assert paths["/generate"]["put"]["requestBody"]
    assert paths["/flush_cache"]["post"]["parameters"][0]["name"] == "timeout"
    assert paths["/v1/models/{model}"]["get"]["parameters"][0] == {
        "name": "model", "in": "path", "required": True, "schema": {"type": "string"},
    }  # fmt: skip
    assert "get" in paths["/openapi.json"] and "get" in paths["/docs"]


def test_sampling_params_schema_has_every_field_with_its_default(document):
    schema = document["components"]["schemas"]["SamplingParams"]
    defaults = SamplingParams().to_dict()
    assert set(schema["properties"]) == set(defaults)
    for name, value in defaults.items():
        assert schema["properties"][name]["default"] == value, name
    assert schema["properties"]["top_k"]["type"] == "integer"
    assert schema["additionalProperties"] is False  # from_dict refuses unknown names


def test_openai_sampling_fields_take_sampling_params_types(document):
    props = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["top_k"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert props["logit_bias"]["anyOf"][0]["type"] == "object"
    assert props["messages"]["items"]["properties"]["role"]["enum"] == [
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
    ]
    generate = document["components"]["schemas"]["GenerateRequest"]["properties"]
    assert generate["return_logprob"]["anyOf"][0] == {"type": "boolean"}  # one value, or one per prompt
    assert "image_data" in generate  # documented as refused


def test_type_schema_of_hints():
    assert type_schema(int | None) == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert type_schema(dict[str, float])["additionalProperties"] == {"type": ["number", "integer"]}

    @dataclasses.dataclass
    class Point:
        x: int
        label: str = "a"

    assert type_schema(Point)["properties"] == {
        "x": {"type": "integer"},
        "label": {"type": "string", "default": "a"},
    }
    with pytest.raises(TypeError):
        type_schema(set[int])


def test_served_without_api_key():
    async def run():
        app = build_app(RouterArgs(worker_addrs=[], api_key="secret"))
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/openapi.json")
            docs = await client.get("/docs")
            guarded = await client.get("/get_model_info")
            return (
                resp.status,
                await resp.json(),
                docs.status,
                docs.content_type,
                await docs.text(),
                guarded.status,
            )

    status, document, docs_status, docs_type, html, guarded = asyncio.run(run())
    assert status == 200 and "/v1/chat/completions" in document["paths"]
    assert docs_status == 200 and docs_type == "text/html"
    assert "POST /v1/chat/completions" in html and 'id="schema-SamplingParams"' in html
    assert guarded == 401  # other routes still need the key
