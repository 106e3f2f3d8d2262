"""The OpenAPI 3.1 document of every route, with schemas from the pydantic models' JSON schemas.

ROUTES is the single list of (method, path) pairs the app serves; a test checks it against the
flask url map, so a route cannot be added without being documented.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve.openai_protocol import ChatCompletion, ChatCompletionChunk, ChatRequest, Completion, CompletionRequest
from serve.openai_protocol import ModelList as ModelListResponse
from serve.tgi_protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    SimpleToken,
    StreamResponse,
    TokenizeRequest,
)

_MODELS: list[type[BaseModel]] = [
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamResponse,
    Info,
    SimpleToken,
    TokenizeRequest,
    ChatRequest,
    ChatCompletion,
    ChatCompletionChunk,
    CompletionRequest,
    Completion,
    ModelListResponse,
]
_GENERATION_ERRORS = (400, 401, 413, 415, 422, 424, 429, 503)
_ERROR_TEXT = {
    400: "Malformed JSON or invalid UTF-8",
    401: "Missing or wrong API key",
    413: "Payload too large",
    415: "Unsupported content type",
    422: "Input validation error",
    424: "Generation error",
    429: "Model is overloaded",
    503: "Unhealthy or draining",
}


def _ref(model: type[BaseModel] | str) -> dict[str, Any]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": f"#/components/schemas/{name}"}


def _one_of(*schemas: dict[str, Any]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"oneOf": list(schemas)}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _sse(schema: dict[str, Any], done: bool = False) -> dict[str, Any]:
    """An event stream whose `schema` describes each event (OpenAPI 3.1): its `data` is a JSON text of `schema`, or of
    the error body a stream ends with when it fails after it began; OpenAI streams end with `data: [DONE]`."""
    data: dict[str, Any] = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"oneOf": [schema, _ref(ErrorResponse)]},
    }
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"text/event-stream": {"schema": event}}


def _operation(
    summary: str, request: dict[str, Any] | None, ok: dict[str, Any], errors: tuple[int, ...]
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok}}
    if 401 not in errors:
        op["security"] = []  # open even when the server has an API key
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": request}}}
    for status in errors:
        op["responses"][str(status)] = _json(_ref(ErrorResponse), _ERROR_TEXT[status])
    return op


def _routes() -> dict[tuple[str, str], dict[str, Any]]:
    gen, chat, cmpl = _ref(GenerateRequest), _ref(ChatRequest), _ref(CompletionRequest)
    generated = _json(_ref(GenerateResponse))
    compat_ok = _json(
        _one_of({"type": "array", "items": _ref(GenerateResponse)}, _ref(ChatCompletion), _ref(Completion))
    )
    compat_ok["content"].update(
        _sse(_one_of(_ref(StreamResponse), _ref(ChatCompletionChunk), _ref(Completion)), done=True)
    )
    tgi_compat_ok = _json({"type": "array", "items": _ref(GenerateResponse)})
    tgi_compat_ok["content"].update(_sse(_ref(StreamResponse)))
    stream_ok = {"description": "Server-sent events", "content": _sse(_ref(StreamResponse))}
    chat_ok = _json(_ref(ChatCompletion))
    chat_ok["content"].update(_sse(_ref(ChatCompletionChunk), done=True))
    cmpl_ok = _json(_ref(Completion))
    cmpl_ok["content"].update(_sse(_ref(Completion), done=True))
    health_ok = {"description": "Ready"}
    text_ok = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    e = _GENERATION_ERRORS
    return {
        ("get", "/ping"): _operation("Readiness (SageMaker): 503 while loading or draining", None, health_ok, (503,)),
        ("get", "/health"): _operation("Liveness: 200 while the engine runs, even draining", None, health_ok, (503,)),
        ("post", "/invocations"): _operation(
            "SageMaker: TGI generate, chat completion or completion by body shape",
            _one_of(gen, chat, cmpl),
            compat_ok,
            e,
        ),
        ("post", "/"): _operation("TGI compat generate (stream per body)", gen, tgi_compat_ok, e),
        ("post", "/generate"): _operation("TGI generate", gen, generated, e),
        ("post", "/generate_stream"): _operation("TGI generate, streamed", gen, stream_ok, e),
        ("post", "/v1/chat/completions"): _operation("OpenAI chat completions", chat, chat_ok, e),
        ("post", "/v1/completions"): _operation("OpenAI completions", cmpl, cmpl_ok, e),
        ("get", "/v1/models"): _operation("OpenAI model list", None, _json(_ref(ModelListResponse)), ()),
        ("get", "/info"): _operation("TGI model and router info", None, _json(_ref(Info)), ()),
        ("post", "/tokenize"): _operation(
            "Tokenize like TGI",
            _ref(TokenizeRequest),
            _json({"type": "array", "items": _ref(SimpleToken)}),
            (400, 401, 413, 415, 422),
        ),
        ("get", "/metrics"): _operation("Prometheus metrics", None, text_ok, ()),
        ("get", "/openapi.json"): _operation("This document", None, _json({"type": "object"}), ()),
    }


ROUTES: tuple[tuple[str, str], ...] = tuple(_routes())


def build_openapi(version: str) -> dict[str, Any]:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in _routes().items():
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SageMaker LLM server",
            "version": version,
            "description": "TGI-compatible and OpenAI-compatible text generation for Amazon SageMaker.",
        },
        "security": [{"bearer": []}],  # only enforced when the server is given an API key
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
