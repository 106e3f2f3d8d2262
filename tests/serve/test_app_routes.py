"""The non-generation routes: health, info, models, tokenize, metrics, the OpenAPI document, unknown
routes; and the access log line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from serve.app import create_app
from serve.engine_protocol import EngineClient, EngineRequest, EngineStats, ModelInfo, TokenEvent, UnavailableError
from serve.openapi import ROUTES
from serve.server_config import ServerConfig
from tests.support.served_app import MAX_INPUT_TOKENS, Served

INFO = ModelInfo("stub", "torch.float32", "cpu", 10, 20, 100, 50, 4, [1])


class StubClient(EngineClient):
    """An engine that never generates, with settable stats."""

    def __init__(self, stats: EngineStats | None) -> None:
        self._stats = stats

    def generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        raise UnavailableError("the engine is not available")
        yield  # pragma: no cover

    def stats(self) -> EngineStats | None:
        return self._stats

    def model_info(self) -> ModelInfo:
        return INFO


def stats(ready: bool = True, draining: bool = False) -> EngineStats:
    return EngineStats(ready, draining, 0, 0, 0, 0.0, 10, time.time())


@pytest.mark.parametrize("route", ["/ping", "/health"])
def test_health(api: FlaskClient, route: str) -> None:
    r = api.get(route)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("state", "route"),
    [(None, "/ping"), (stats(ready=False), "/ping"), (stats(draining=True), "/ping"),
     (None, "/health"), (stats(ready=False), "/health")],
)  # fmt: skip
def test_unhealthy_is_503(serve_env: Served, state: EngineStats | None, route: str) -> None:
    app = create_app(StubClient(state), ServerConfig("stub", 10, 20), serve_env.worker_tokenizer())
    r = app.test_client().get(route)
    assert r.status_code == 503
    assert r.json["error_type"] == "unhealthy" and "unhealthy" in r.json["error"]


def test_health_is_liveness(serve_env: Served) -> None:
    """/health stays 200 while draining (a liveness probe must not kill a pod finishing its requests) and when the
    engine is saturated; /ping is readiness: 503 while draining, 200 when busy."""
    saturated = EngineStats(True, False, queue_size=500, batch_size=4, in_flight=4, kv_cache_usage=1.0,
                            kv_cache_blocks=10, time=time.time())  # fmt: skip
    for state, ping in ((stats(draining=True), 503), (saturated, 200)):
        client = create_app(StubClient(state), ServerConfig("stub", 10, 20), serve_env.worker_tokenizer()).test_client()
        assert (client.get("/health").status_code, client.get("/ping").status_code) == (200, ping)


def test_health_while_the_engine_is_stuck_in_a_step_and_draining(
    serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine: held inside step() with a request in flight, then draining; /health answers 200 at once."""
    held, real_step = threading.Event(), serve_env.engine.step

    def held_step() -> list:
        held.wait(10)
        return real_step()

    monkeypatch.setattr(serve_env.engine, "step", held_step)
    result: list[int] = []
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
    thread = threading.Thread(target=lambda: result.append(api.post("/generate", json=body).status_code))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while serve_env.client.num_in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert serve_env.client.num_in_flight == 1
        started = time.perf_counter()
        assert api.get("/health").status_code == 200 and api.get("/ping").status_code == 200
        assert time.perf_counter() - started < 0.5  # never waits on the engine loop
        serve_env.client.drain()
        held.set()
        thread.join(10)
        assert result == [200]  # the in-flight request finished during the drain
        deadline = time.monotonic() + 5
        while not serve_env.client.stats().draining and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        assert api.get("/health").status_code == 200
        assert api.get("/ping").status_code == 503
    finally:
        held.set()
        serve_env.client.drain(False)
        thread.join(10)
    deadline = time.monotonic() + 5
    while serve_env.client.stats().draining and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    assert api.get("/ping").status_code == 200


def test_a_request_queued_before_the_drain_is_served(
    serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the engine loop has not taken yet when the drain begins (the loop busy in a step) is in flight:
    it is served, not refused; one sent after the drain is refused (503)."""
    held, real_step = threading.Event(), serve_env.engine.step
    stepping = threading.Event()

    def held_step() -> list:
        stepping.set()
        held.wait(10)
        return real_step()

    monkeypatch.setattr(serve_env.engine, "step", held_step)
    results: list[int] = []
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}

    def post() -> None:
        results.append(api.post("/generate", json=body).status_code)

    first, queued = threading.Thread(target=post), threading.Thread(target=post)
    try:
        first.start()
        assert stepping.wait(10)  # the loop is inside a step with the first request
        queued.start()
        deadline = time.monotonic() + 10
        while serve_env.client.num_in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert serve_env.client.num_in_flight == 2  # the second waits in the queue the loop reads between steps
        serve_env.client.drain()
        held.set()
        first.join(10)
        queued.join(10)
        assert results == [200, 200]
        assert api.post("/generate", json=body).status_code == 503  # sent during the drain
    finally:
        held.set()
        serve_env.client.drain(False)
        first.join(10)
        queued.join(10)
    deadline = time.monotonic() + 5
    while serve_env.client.stats().draining and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)


def test_info(api: FlaskClient, serve_env: Served) -> None:
    info = api.get("/info").json
    assert info["model_id"] == "tiny-llama"
    assert info["model_dtype"] == "torch.float32" and info["model_device_type"] == "cpu"
    assert info["max_input_tokens"] == info["max_input_length"] == serve_env.config.max_input_tokens
    assert info["max_total_tokens"] == serve_env.config.max_total_tokens
    expected = ("max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_client_batch_size")
    for key in expected:
        assert info[key] == getattr(serve_env.config, key)
    assert info["max_batch_total_tokens"] == 4096
    assert info["router"] == "text-generation-router" and info["version"]
    assert info["model_implementation"] == "native"


def test_models(api: FlaskClient) -> None:
    body = api.get("/v1/models").json
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("tiny-llama", "model")]


def test_tokenize(api: FlaskClient, serve_env: Served) -> None:
    text = "Hello wörld"
    tokens = api.post("/tokenize", json={"inputs": text}).json
    assert [t["id"] for t in tokens] == serve_env.tokenizer(text)["input_ids"]
    assert tokens[0]["text"] == "" and tokens[0]["start"] == tokens[0]["stop"] == 0  # <s>
    assert "".join(t["text"] for t in tokens) == text
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in tokens)
    for text in ("東京 😀 </s> x", "  spaced  "):  # the workers' offsets are transformers' (emoji: several tokens)
        tokens = api.post("/tokenize", json={"inputs": text, "add_special_tokens": False}).json
        want = serve_env.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert [(t["id"], t["start"], t["stop"]) for t in tokens] == [
            (i, a, b) for i, (a, b) in zip(want["input_ids"], want["offset_mapping"])
        ]


def test_metrics_names_and_counts(api: FlaskClient) -> None:
    assert api.post("/generate", json={"inputs": "Hi there", "parameters": {"max_new_tokens": 4}}).status_code == 200
    assert api.post("/generate", json={"inputs": ""}).status_code == 422
    r = api.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["tgi_request_count_total"] == 2
    assert values["tgi_request_success_total"] == 1
    assert values['tgi_request_failure_total{err="validation"}'] == 1
    assert values["tgi_request_generated_tokens_sum"] == 4
    assert values["tgi_request_duration_count"] == 1
    assert values["llm_time_to_first_token_seconds_count"] == 1
    assert values["llm_inter_token_latency_seconds_count"] == 3
    for name in (
        "tgi_request_validation_duration_count",
        "tgi_request_queue_duration_count",
        "tgi_request_inference_duration_count",
        "tgi_request_mean_time_per_token_duration_count",
        "tgi_request_input_length_count",
        "tgi_request_max_new_tokens_count",
    ):
        assert values[name] == 1, name
    for gauge in (
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "llm_kv_cache_usage_ratio",
    ):
        assert gauge in values
    assert values["llm_engine_ready"] == 1


def test_prefix_cache_hits_are_counted(api: FlaskClient, serve_env: Served) -> None:
    """The same long prompt twice: the second reuses the first's full KV blocks, and /metrics counts them."""

    def hits() -> float:
        text = api.get("/metrics").get_data(as_text=True)
        line = next(x for x in text.splitlines() if x.startswith("llm_prefix_cache_hit_tokens_total "))
        return float(line.rsplit(" ", 1)[1])

    prompt = "the quick brown fox jumps over the lazy dog " * 40
    ids = serve_env.tokenizer(prompt)["input_ids"][: MAX_INPUT_TOKENS - 1]
    prompt = serve_env.tokenizer.decode(ids[1:])  # within the input limit (the tokenizer adds <s> again)
    assert len(serve_env.tokenizer(prompt)["input_ids"]) > 64  # more than one CPU block of 64
    before = hits()
    answers = [api.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 3}}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200] and answers[0].json == answers[1].json
    deadline = time.monotonic() + 5
    while hits() == before:  # engine stats are refreshed a few times a second
        assert time.monotonic() < deadline, "no prefix-cache hit was counted"
        time.sleep(0.05)
    assert (hits() - before) % 64 == 0


def test_metrics_multiprocess_dir(serve_env: Served, tmp_path) -> None:  # noqa: ANN001
    """With a multiprocess directory /metrics merges the workers' files and still reports the gauges."""
    text = serve_env.app(metrics_dir=str(tmp_path)).test_client().get("/metrics").get_data(as_text=True)
    assert "tgi_queue_size" in text and "llm_kv_cache_usage_ratio" in text


def test_openapi_lists_every_route(serve_env: Served) -> None:
    app = serve_env.app()
    served = {
        (method.lower(), rule.rule)
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    assert served == set(ROUTES)
    doc = app.test_client().get("/openapi.json").json
    assert doc["openapi"].startswith("3.")
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served
    schemas = doc["components"]["schemas"]
    for name in ("GenerateRequest", "GenerateParameters", "GenerateResponse", "StreamResponse", "ChatRequest"):
        assert name in schemas
    refs = json.dumps(doc)
    for ref in {part.split('"')[0] for part in refs.split("#/components/schemas/")[1:]}:
        assert ref in schemas, ref


def test_unknown_route_and_method_are_json(api: FlaskClient) -> None:
    r = api.get("/nope")
    assert r.status_code == 404 and r.json["error_type"] == "not_found"
    r = api.get("/generate")
    assert r.status_code == 405 and r.json["error_type"] == "method_not_allowed"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def access_log() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("serve.access")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.mark.parametrize("log_prompts", [False, True])
def test_access_log_line(serve_env: Served, access_log: _Lines, log_prompts: bool) -> None:
    client = serve_env.app(log_prompts=log_prompts).test_client()
    secret = "my secret prompt"
    headers = {"X-Amzn-SageMaker-Custom-Attributes": "trace=1"}
    r = client.post("/generate", json={"inputs": secret, "parameters": {"max_new_tokens": 3}}, headers=headers)
    client.get("/ping")  # a passing probe is not logged
    assert r.status_code == 200
    assert len(access_log.lines) == 1
    line = access_log.lines[0]
    assert line["id"] == r.headers["x-request-id"]
    assert line["route"] == "/generate" and line["status"] == 200 and line["custom_attributes"] is True
    assert line["prompt_tokens"] == int(r.headers["x-prompt-tokens"]) and line["generated_tokens"] == 3
    assert line["finish_reason"] == "length"
    assert line["ttft_ms"] > 0 and line["total_ms"] >= line["ttft_ms"] and line["queue_ms"] is not None
    assert (secret in json.dumps(line)) is log_prompts
    assert "trace=1" not in json.dumps(line)


def test_messages_api_disabled_refuses_chat_bodies_on_invocations(serve_env) -> None:
    """MESSAGES_API_ENABLED=false: /invocations takes TGI bodies only (422 for `messages`); the OpenAI route stays."""
    api = serve_env.app(messages_api_enabled=False).test_client()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = api.post("/invocations", json=body)
    assert r.status_code == 422 and "MESSAGES_API_ENABLED" in r.json["error"]
    assert api.post("/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert api.post("/v1/chat/completions", json=body).status_code == 200
