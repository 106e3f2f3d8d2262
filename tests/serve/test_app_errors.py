"""Every error status and body: 422 (TGI's messages), 413, 400, 415, 401, 429, 424 and 503, all as
{"error", "error_type"}; streaming requests that fail admission get a real status before any byte.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from flask.testing import FlaskClient

from serve.engine_protocol import OverloadedError
from tests.support.served_app import CHAT, Served, error
from tests.support.sse import sse_events

TGI_422 = [
    ({"inputs": ""}, "`inputs` cannot be empty"),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, "`max_new_tokens` must be strictly positive"),
    ({"inputs": "Hi", "parameters": {"temperature": 0}}, "`temperature` must be strictly positive"),
    ({"inputs": "Hi", "parameters": {"top_p": 1.0}}, "`top_p` must be > 0.0 and < 1.0"),
    ({"inputs": "Hi", "parameters": {"typical_p": 1.5}}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"inputs": "Hi", "parameters": {"top_k": 0}}, "`top_k` must be strictly positive"),
    ({"inputs": "Hi", "parameters": {"repetition_penalty": 0}}, "`repetition_penalty` must be strictly positive"),
    ({"inputs": "Hi", "parameters": {"frequency_penalty": 3}}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"inputs": "Hi", "parameters": {"stop": list("abcde")}}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"inputs": "Hi", "parameters": {"top_n_tokens": 6}}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (
        {"inputs": "Hi", "parameters": {"truncate": 0}},
        "`truncate` must be strictly positive and less than 96. Given: 0",
    ),
    (
        {"inputs": "Hi", "parameters": {"truncate": 97}},
        "`truncate` must be strictly positive and less than 96. Given: 97",
    ),
    ({"inputs": "Hi", "parameters": {"best_of": 3, "do_sample": True}}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"inputs": "Hi", "parameters": {"best_of": 2}}, "you must use sampling when `best_of` is > 1"),
    (
        {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True, "seed": 1}},
        "`seed` must not be set when `best_of` > 1",
    ),
    ({"inputs": "Hi", "parameters": {"seed": -1}}, "`seed` must be >= 0 and < 2^64. Given: -1"),
    ({"inputs": "Hi", "parameters": {"watermark": True}}, "watermark is not supported"),
    (
        {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "(a"}}},
        'grammar is not valid: invalid regex "(a": unclosed group',
    ),
    ({"inputs": "Hi", "parameters": {"stop": [""]}}, "`stop` sequences must be non-empty strings, got ''"),
    ({"inputs": 5}, "Failed to deserialize the JSON body into the target type: inputs: Input should be a valid string"),
    ({"parameters": {}}, "Failed to deserialize the JSON body into the target type: inputs: Field required"),
]


@pytest.mark.parametrize(("body", "message"), TGI_422)
def test_generate_422(api: FlaskClient, body: dict, message: str) -> None:
    assert error(api.post("/generate", json=body), 422, "validation") == message


def sentences(tokenizer: object, low: int, high: int) -> tuple[str, int]:
    """Repeated text whose token count n is in [low, high]."""
    for k in range(1, 40):
        text = "The quick brown fox jumps over the lazy dog. " * k
        n = len(tokenizer(text)["input_ids"])  # type: ignore[operator]
        if low <= n <= high:
            return text, n
    raise AssertionError("no repetition count fits")


def test_token_budget_422(api: FlaskClient, serve_env: Served) -> None:
    n = len(serve_env.tokenizer("Hello world")["input_ids"])
    r = api.post("/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 200}})
    expected = f"`inputs` tokens + `max_new_tokens` must be <= 128. Given: {n} `inputs` tokens and 200 `max_new_tokens`"
    assert error(r, 422, "validation") == expected
    long_text, n_long = sentences(serve_env.tokenizer, 129, 400)
    r = api.post("/generate", json={"inputs": long_text, "parameters": {"max_new_tokens": 1}})
    expected = (
        f"`inputs` tokens + `max_new_tokens` must be <= 128. Given: {n_long} `inputs` tokens and 1 `max_new_tokens`"
    )
    assert error(r, 422, "validation") == expected
    medium, n_medium = sentences(serve_env.tokenizer, 97, 126)
    r = api.post("/generate", json={"inputs": medium, "parameters": {"max_new_tokens": 1}})
    assert error(r, 422, "validation") == f"`inputs` must have less than 96 tokens. Given: {n_medium}"
    r = api.post("/generate", json={"inputs": medium, "parameters": {"max_new_tokens": 1, "truncate": 50}})
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "50"
    chat_ids = serve_env.tokenizer(
        serve_env.tokenizer.apply_chat_template(CHAT["messages"], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]  # noqa: E501
    r = api.post("/v1/chat/completions", json={**CHAT, "max_tokens": 500})
    expected = f"`inputs` tokens + `max_new_tokens` must be <= 128. Given: {len(chat_ids)} `inputs` tokens and 500 `max_new_tokens`"  # noqa: E501
    assert error(r, 422, "validation") == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True}},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"inputs": "Hi", "parameters": {"decoder_input_details": True}},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
        ({"inputs": ""}, "`inputs` cannot be empty"),
    ],
)
def test_stream_validation_is_a_real_422(api: FlaskClient, body: dict, message: str) -> None:
    assert error(api.post("/generate_stream", json=body), 422, "validation") == message
    assert error(api.post("/invocations", json={**body, "stream": True}), 422, "validation") == message


def chunked(client: FlaskClient, body: bytes) -> object:
    """POST `body` as a server hands over a chunked one: no Content-Length, a stream the server ends."""
    return client.post(
        "/generate",
        environ_overrides={"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "CONTENT_LENGTH": ""},
        content_type="application/json",
    )


def test_payload_too_large_413(serve_env: Served) -> None:
    client = serve_env.app(payload_limit=1000).test_client()
    big = {"inputs": "x" * 2000}
    assert "Payload too large" in error(client.post("/generate", json=big), 413, "payload_too_large")
    # a body without Content-Length is refused by the bytes read, never cut at the limit and parsed
    error(chunked(client, b'{"inputs": "' + b"x" * 2000 + b'"}'), 413, "payload_too_large")
    valid = b'{"inputs": "Hi", "parameters": {"max_new_tokens": 2}}'
    error(chunked(client, valid + b" " * (1000 - len(valid)) + b"junk"), 413, "payload_too_large")
    assert chunked(client, valid + b" " * (1000 - len(valid))).status_code == 200  # exactly the limit


def test_malformed_json_and_invalid_utf8_400(api: FlaskClient) -> None:
    msg = error(api.post("/generate", data=b'{"inputs": "Hi",', content_type="application/json"), 400, "bad_request")
    assert msg.startswith("Failed to parse the request body as JSON")
    msg = error(
        api.post("/generate", data=b'{"inputs": "\xff\xfe"}', content_type="application/json"), 400, "bad_request"
    )
    assert msg.startswith("The request body is not valid UTF-8")
    nan = b'{"inputs": "Hi", "parameters": {"temperature": NaN}}'
    error(api.post("/generate", data=nan, content_type="application/json"), 400, "bad_request")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_unsupported_content_type_415(api: FlaskClient, content_type: str) -> None:
    r = api.post("/generate", data=b'{"inputs": "Hi"}', content_type=content_type)
    assert "Content-Type: application/json" in error(r, 415, "unsupported_media_type")


def test_api_key_401(serve_env: Served) -> None:
    client = serve_env.app(api_key="s3cret").test_client()
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    r = client.post("/generate", json=body)
    assert error(r, 401, "authentication").startswith("Unauthorized") and r.headers["WWW-Authenticate"] == "Bearer"
    error(client.post("/generate", json=body, headers={"Authorization": "Bearer nope"}), 401, "authentication")
    error(client.post("/tokenize", json={"inputs": "Hi"}), 401, "authentication")  # as in TGI: it runs the tokenizer
    error(client.post("/v1/chat/completions", json=CHAT), 401, "authentication")
    assert client.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # open, as in TGI: health, metrics and what the endpoint serves (its OpenAPI document included)
    for route in ("/ping", "/health", "/metrics", "/info", "/v1/models", "/openapi.json"):
        assert client.get(route).status_code == 200, route


@pytest.fixture
def gate(serve_env: Served, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold the engine loop inside step() until the event is set (requests stay in flight)."""
    event = threading.Event()
    real_step = serve_env.engine.step

    def held_step() -> list:
        event.wait(10)
        return real_step()

    monkeypatch.setattr(serve_env.engine, "step", held_step)
    yield event
    event.set()


def test_overloaded_429(
    serve_env: Served, api: FlaskClient, gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: E501
    monkeypatch.setattr(serve_env.client.loop, "max_concurrent_requests", 2)
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(api.post("/generate", json=body).status_code)) for _ in range(2)
    ]  # noqa: E501
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while serve_env.client.num_in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert serve_env.client.num_in_flight == 2
    # Admission is the engine loop's (as in the engine process): requests beyond the limit are refused at the loop's
    # next turn, once the step in progress ends.
    chat = {**CHAT, "max_tokens": 2, "stream": True}
    over = [("/generate", body), ("/generate_stream", body), ("/v1/chat/completions", chat)]
    refused: list = []
    extra = [threading.Thread(target=lambda r=r, b=b: refused.append(api.post(r, json=b))) for r, b in over]
    for t in extra:
        t.start()
    started = time.perf_counter()
    assert api.get("/ping").status_code == 200  # the engine loop is stuck in a step, /ping is not
    assert time.perf_counter() - started < 0.5
    deadline = time.monotonic() + 10  # every refused request has reached the loop's inbox before the step ends
    while serve_env.client.num_in_flight < 2 + len(over) and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.set()
    for t in threads + extra:
        t.join(10)
    assert results == [200, 200]
    assert [error(r, 429, "overloaded") for r in refused] == ["Model is overloaded"] * 3
    assert issubclass(OverloadedError, Exception)


def failing_step(serve_env: Served, after: int) -> Callable[[], list]:
    real_step, calls = serve_env.engine.step, [0]

    def step() -> list:
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("boom")
        return real_step()

    return step


def test_a_failed_step_fails_the_engine(serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that raises (the model or the device failed) fails every request in flight with 424 and stops the
    engine loop, as in the engine process: /ping turns 503 and later requests get 503 (the container is replaced)."""
    monkeypatch.setattr(serve_env.engine, "step", failing_step(serve_env, after=3))
    r = api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 20}})
    assert error(r, 424, "generation") == "the engine failed: RuntimeError: boom"
    deadline = time.monotonic() + 5
    while serve_env.client.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert error(api.get("/ping"), 503, "unhealthy") == "unhealthy: the engine is not ready"
    r = api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert error(r, 503, "unhealthy")


def test_a_failed_step_before_the_first_token_is_a_real_status_for_a_stream(
    serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve_env.engine, "step", failing_step(serve_env, after=0))
    r = api.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 20}})
    assert error(r, 424, "generation") == "the engine failed: RuntimeError: boom"


def test_generation_failure_mid_stream_is_an_sse_error(
    serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve_env.engine, "step", failing_step(serve_env, after=3))
    r = api.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 20}})
    assert r.status_code == 200
    events = sse_events(r.get_data())
    assert events[-1] == {"error": "the engine failed: RuntimeError: boom", "error_type": "generation"}
    assert all("token" in e for e in events[:-1]) and len(events) == 4


def test_generation_failure_mid_chat_stream_is_an_sse_error(
    serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve_env.engine, "step", failing_step(serve_env, after=2))
    r = api.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20, "stream": True})
    events = sse_events(r.get_data())
    assert events[-1] == {"error": "the engine failed: RuntimeError: boom", "error_type": "generation"}
    assert "[DONE]" not in events


def test_one_requests_failure_leaves_the_others_and_the_engine(
    serve_env: Served, api: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure of one request's own (its sampling row) answers it 424 while a concurrent request finishes and
    the engine serves on: the engine's isolation, through the HTTP layer."""
    from engine.sampler import Sampler

    real = Sampler.__call__

    def poisoned(self, logits, requests):
        if any(r.params.top_n_tokens == 3 for r in requests):
            logits = logits.clone()
            row = next(i for i, r in enumerate(requests) if r.params.top_n_tokens == 3)
            logits[row] = float("nan")
        return real(self, logits, requests)

    monkeypatch.setattr(Sampler, "__call__", poisoned)
    results: dict[str, object] = {}
    good = threading.Thread(
        target=lambda: results.update(
            good=api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 12}})
        )
    )
    good.start()
    bad = api.post(
        "/generate", json={"inputs": "Hey", "parameters": {"max_new_tokens": 12, "top_n_tokens": 3, "details": True}}
    )
    good.join(10)
    assert "not finite" in error(bad, 424, "generation")
    assert results["good"].status_code == 200  # type: ignore[attr-defined]
    assert api.get("/ping").status_code == 200 and serve_env.client.running


def test_draining_503(serve_env: Served, api: FlaskClient) -> None:
    serve_env.client.drain()
    try:
        deadline = time.monotonic() + 5
        while not serve_env.client.stats().draining and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        assert error(api.get("/ping"), 503, "unhealthy") == "unhealthy: the server is draining"
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        assert error(api.post("/generate", json=body), 503, "unhealthy") == "the server is shutting down"
        assert error(api.post("/generate_stream", json=body), 503, "unhealthy") == "the server is shutting down"
    finally:
        serve_env.client.drain(False)
    deadline = time.monotonic() + 5
    while serve_env.client.stats().draining and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    assert api.get("/ping").status_code == 200
