"""The flask app: `create_app(client, config, tokenizer)` wires routes over any EngineClient.

Request checks (API key, content type, size, JSON limits: serve/body.py) run before a body is parsed; every exception
is turned into {"error", "error_type"} with its status in one handler; each request is timed, counted and logged
once, when its response (or its stream) is closed. The API key guards generation and /tokenize, as TGI's does;
health, metrics and the model's description stay open.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request

from serve.body import parse_json, read_body
from serve.engine_protocol import EngineClient, ModelInfo, UnavailableError, ValidationError
from serve.errors import HttpError, classify
from serve.metrics import CONTENT_TYPE, Metrics, ensure_access_log_handler
from serve.openai_api import OpenAIApi
from serve.openai_protocol import ChatRequest, CompletionRequest, ModelCard, ModelList
from serve.openapi import build_openapi
from serve.request_record import RequestRecord
from serve.server_config import ServerConfig
from serve.services import Services
from serve.tgi_api import TgiApi
from serve.tgi_protocol import GenerateRequest, Info, SimpleToken, TokenizeRequest
from serve.token_decoder import TokenDecoder
from serve.tracing import Tracing
from serve.validation import Validator

OPEN_ENDPOINTS = frozenset({"ping", "health", "metrics", "info", "models", "openapi"})  # never behind the API key
QUIET_ENDPOINTS = frozenset({"ping", "health", "metrics"})  # logged only when they fail
GENERATION_ENDPOINTS = frozenset(
    {"invocations", "compat_generate", "generate", "generate_stream", "chat", "completions"}
)


def _version() -> str:
    try:
        return importlib.metadata.version("sagemaker-llm-server")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def create_app(
    client: EngineClient,
    config: ServerConfig,
    tokenizer: Any,
    serving: Callable[[], bool] | None = None,
    tracing: Tracing | None = None,
) -> Flask:
    """`serving`: whether the container has handed this worker the port (/ping is 503 until then); None: always.
    `tracing`: the worker's tracer (serve/tracing.py); None: tracing off, no span work at all."""
    app = Flask("serve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.payload_limit
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    ensure_access_log_handler()
    version = _version()
    started = int(time.time())
    info_cache: list[ModelInfo] = []

    def model_info() -> ModelInfo:
        if not info_cache:
            info_cache.append(client.model_info())
        return info_cache[0]

    def compute_type() -> str:
        return config.compute_type or model_info().model_device_type

    metrics = Metrics(client, config.metrics_dir)
    services = Services(client, config, Validator(config, tokenizer), TokenDecoder(tokenizer), metrics, compute_type)
    tgi = TgiApi(services)
    openai = OpenAIApi(services, system_fingerprint=f"{version}-native")
    openapi_doc = build_openapi(version)

    # ---- around every request ---------------------------------------------------------------

    @app.before_request
    def begin() -> None:
        endpoint = request.endpoint or ""
        rule = request.url_rule.rule if request.url_rule is not None else request.path
        record = RequestRecord(uuid.uuid4().hex, rule, request.method, generation=endpoint in GENERATION_ENDPOINTS)
        record.custom_attributes = "X-Amzn-SageMaker-Custom-Attributes" in request.headers
        g.record = record
        metrics.started(record)
        if config.api_key is not None and endpoint not in OPEN_ENDPOINTS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
                raise HttpError(401, "Unauthorized: a valid `Authorization: Bearer <key>` header is required")

    @app.after_request
    def end(response: Response) -> Response:
        record: RequestRecord | None = g.get("record")
        if record is not None:
            record.status = response.status_code
            if record.status >= 400 and record.error_type is None:
                record.error_type = "http"
            response.headers["x-request-id"] = record.request_id
            if request.endpoint in QUIET_ENDPOINTS and record.status < 400:
                record.done = True  # no log line for a passing probe or scrape
            else:
                response.call_on_close(lambda: metrics.finish(record))
        return response

    @app.errorhandler(Exception)
    def error(exc: Exception) -> Response:
        status, message, error_type = classify(exc)
        record: RequestRecord | None = g.get("record")
        if record is not None:
            record.error_type = error_type
        response = jsonify({"error": message, "error_type": error_type})
        response.status_code = status
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    if tracing is not None:  # after the hooks above: the record exists when the tracing hooks run
        from serve.http_tracing import RequestTracing

        RequestTracing(tracing, config.log_prompts, QUIET_ENDPOINTS).install(app)

    def body_object() -> dict[str, Any]:
        """The JSON object in the body, after the content-type and size checks (nothing parsed before)."""
        mimetype = request.mimetype
        if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
            raise HttpError(415, f"Expected request with `Content-Type: application/json`, got `{mimetype}`")
        data = parse_json(read_body(request.environ, config.payload_limit))
        if not isinstance(data, dict):
            raise ValidationError("The request body must be a JSON object")
        return data

    def record() -> RequestRecord:
        return g.record

    # ---- health, info -----------------------------------------------------------------------

    @app.get("/ping", endpoint="ping")
    @app.get("/health", endpoint="health")
    def health() -> Response:
        """/ping is readiness (SageMaker's): 503 while draining. /health is liveness: 200 while the engine runs,
        busy or draining, so a liveness probe never restarts a pod that is working or finishing its requests."""
        stats = client.stats()  # never waits on the engine loop; None once the engine is gone or silent
        if stats is None or not stats.ready:
            raise UnavailableError("unhealthy: the engine is not ready")
        if stats.draining and request.endpoint == "ping":
            raise UnavailableError("unhealthy: the server is draining")
        if serving is not None and not serving():
            raise UnavailableError("unhealthy: the server is starting")
        return Response(status=200)

    @app.get("/info", endpoint="info")
    def info() -> Response:
        mi = model_info()
        body = Info(
            model_id=config.model_id,
            model_dtype=mi.model_dtype,
            model_device_type=mi.model_device_type,
            max_concurrent_requests=config.max_concurrent_requests,
            max_best_of=config.max_best_of,
            max_stop_sequences=config.max_stop_sequences,
            max_top_n_tokens=config.max_top_n_tokens,
            max_input_tokens=config.max_input_tokens,
            max_input_length=config.max_input_tokens,
            max_total_tokens=config.max_total_tokens,
            max_batch_total_tokens=mi.max_batch_total_tokens,
            max_batch_prefill_tokens=mi.max_batch_prefill_tokens,
            max_client_batch_size=config.max_client_batch_size,
            quantize=mi.extra.get("quantize"),
            model_implementation=mi.extra.get("model_implementation", "native"),
            version=version,
        )
        return jsonify(body.model_dump(mode="json"))

    @app.get("/v1/models", endpoint="models")
    def models() -> Response:
        card = ModelCard(id=config.model_id, created=started, owned_by="sagemaker-llm-server")
        return jsonify(ModelList(data=[card]).model_dump(mode="json"))

    @app.get("/metrics", endpoint="metrics")
    def metrics_route() -> Response:
        return Response(metrics.render(), status=200, content_type=CONTENT_TYPE)

    @app.get("/openapi.json", endpoint="openapi")
    def openapi() -> Response:
        return jsonify(openapi_doc)

    @app.post("/tokenize", endpoint="tokenize")
    def tokenize() -> Response:
        body = TokenizeRequest.model_validate(body_object())
        try:
            enc = tokenizer(body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
            spans = list(zip(enc["input_ids"], enc["offset_mapping"]))
        except NotImplementedError:  # a slow tokenizer has no offsets: place each token's own text
            spans, end = [], 0
            for i in services.validator.encode(body.inputs, body.add_special_tokens):
                found = body.inputs.find(services.decoder(i), end)
                start = found if found >= 0 and services.decoder(i) else end
                end = start + len(services.decoder(i)) if found >= 0 else end
                spans.append((i, (start, end)))
        except Exception as e:  # the tokenizer refusing an input is the input's problem (as in validation)
            raise ValidationError(f"tokenizer error {e}") from e
        tokens = [SimpleToken(id=i, text=body.inputs[a:b], start=a, stop=b).model_dump() for i, (a, b) in spans]
        return jsonify(tokens)

    # ---- generation -------------------------------------------------------------------------

    @app.post("/invocations", endpoint="invocations")
    def invocations() -> Response:
        """SageMaker's route: the body's shape picks the API, in TGI's order."""
        data = body_object()
        if "inputs" in data:
            body = GenerateRequest.model_validate(data)
            return tgi.respond(body, record(), stream=body.stream, compat=True)
        if "messages" in data:
            if not config.messages_api_enabled:
                raise ValidationError("The Messages API is disabled (MESSAGES_API_ENABLED=false): send `inputs`")
            return openai.chat(ChatRequest.model_validate(data), record())
        if "prompt" in data:
            return openai.completion(CompletionRequest.model_validate(data), record())
        raise ValidationError("The request body needs `inputs` (TGI), `messages` (chat) or `prompt` (completions)")

    @app.post("/", endpoint="compat_generate")
    def compat_generate() -> Response:
        body = GenerateRequest.model_validate(body_object())
        return tgi.respond(body, record(), stream=body.stream, compat=True)

    @app.post("/generate", endpoint="generate")
    def generate() -> Response:
        return tgi.respond(GenerateRequest.model_validate(body_object()), record(), stream=False, compat=False)

    @app.post("/generate_stream", endpoint="generate_stream")
    def generate_stream() -> Response:
        return tgi.respond(GenerateRequest.model_validate(body_object()), record(), stream=True, compat=False)

    @app.post("/v1/chat/completions", endpoint="chat")
    def chat() -> Response:
        return openai.chat(ChatRequest.model_validate(body_object()), record())

    @app.post("/v1/completions", endpoint="completions")
    def completions() -> Response:
        return openai.completion(CompletionRequest.model_validate(body_object()), record())

    app.extensions["serve"] = services
    return app
