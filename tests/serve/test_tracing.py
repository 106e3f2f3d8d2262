"""Tracing in one process: the flask app and the EngineLoop over the shared tiny engine, spans collected by the SDK's
InMemorySpanExporter. The caller's trace context parents the request span (W3C headers or SageMaker's custom
attributes); the engine's request span is its child, with queue/prefill/decode children, and each engine step
links to the requests it ran. Streamed, non-streamed, 422, 401 and client disconnects; no prompt text or token
ids in attributes unless LOG_PROMPTS; the trace id in the response header and the access log line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from serve.app import create_app
from serve.engine_tracing import EngineSpans
from serve.http_tracing import custom_attributes_context
from serve.tracing import Tracing, TracingConfig
from tests.support.served_app import BufferedClient, Served

TRACE, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
PROMPT = "The quick brown fox jumps over"


class Traced:
    def __init__(self, served: Served, exporter: InMemorySpanExporter, tracing: Tracing) -> None:
        self.served, self.exporter, self.tracing = served, exporter, tracing

    def app(self, **overrides: Any) -> Flask:
        s = self.served
        app = create_app(s.client, s.config.replace(**overrides), s.worker_tokenizer(), tracing=self.tracing)
        app.test_client_class = BufferedClient
        return app

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def wait_for(self, condition: Callable[[list[ReadableSpan]], bool], timeout: float = 10) -> list[ReadableSpan]:
        deadline = time.monotonic() + timeout
        while not condition(spans := self.spans()):
            assert time.monotonic() < deadline, sorted(s.name for s in spans)
            time.sleep(0.01)
        return spans


@pytest.fixture
def traced(serve_env: Served) -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingConfig("http://127.0.0.1:4318"), "test", exporter=exporter)
    serve_env.client.loop.spans = EngineSpans(tracing)  # the loop thread reads it at its next request
    try:
        yield Traced(serve_env, exporter, tracing)
    finally:
        serve_env.client.loop.spans = None
        tracing.shutdown()


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


def assert_private(spans: list[ReadableSpan], prompt: str, token_ids: list[int]) -> None:
    """No attribute holds the prompt (or a piece of it) or the token ids."""
    for s in spans:
        for key, value in (s.attributes or {}).items():
            assert not (isinstance(value, str) and (prompt in value or value in prompt and len(value) > 3)), key
            assert not (isinstance(value, tuple) and len(value) > 1 and list(value) == token_ids[: len(value)]), key


def check_engine_spans(spans: list[ReadableSpan], http: ReadableSpan, generated: int) -> ReadableSpan:
    """The engine.request span under `http`, with queue -> prefill -> decode in order, and the steps linked to it."""
    engine = children(spans, http)["engine.request"]
    assert engine.context.trace_id == http.context.trace_id
    assert engine.attributes["gen_ai.usage.output_tokens"] == generated
    parts = children(spans, engine)
    assert list(sorted(parts)) == ["decode", "prefill", "queue"]
    assert parts["queue"].end_time == parts["prefill"].start_time <= parts["prefill"].end_time
    assert parts["prefill"].end_time == parts["decode"].start_time <= parts["decode"].end_time
    assert engine.start_time <= parts["queue"].start_time + 1_000_000 and parts["decode"].end_time <= engine.end_time
    assert http.start_time <= engine.start_time and engine.end_time <= http.end_time
    steps = [
        s for s in spans if s.name == "engine.step" and engine.context.span_id in {k.context.span_id for k in s.links}
    ]
    assert len(steps) == generated  # the prefill step samples the first token, then one decode step per token
    for step in steps:
        assert step.parent is None  # linked, not parented: one step serves every request in it
        assert step.attributes["llm.batch.size"] >= 1 and 0 <= step.attributes["llm.kv_cache.usage"] <= 1
    assert steps[0].attributes["llm.kv_cache.usage"] > 0  # measured as the step ends: the last one freed its blocks
    return engine


def test_non_streamed_request_is_parented_by_the_w3c_headers(traced: Traced) -> None:
    tokenizer = traced.served.tokenizer
    r = traced.app().test_client().post(
        "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}},
        headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"},
    )  # fmt: skip
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["x-trace-id"] == TRACE
    spans = traced.spans()
    http = one(spans, "POST /generate")
    assert http.kind == SpanKind.SERVER and format(http.context.trace_id, "032x") == TRACE
    assert http.parent is not None and format(http.parent.span_id, "016x") == PARENT
    assert http.context.trace_state.get("vendor") == "abc"
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    a = http.attributes
    assert (
        a["http.route"] == "/generate" and a["http.request.method"] == "POST" and a["http.response.status_code"] == 200
    )
    assert a["gen_ai.usage.input_tokens"] == len(prompt_ids) and a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["llm.time_to_first_token_s"] > 0
    assert a["llm.stream"] is False and "error.type" not in a
    validate = children(spans, http)["validate"]
    assert validate.attributes["gen_ai.usage.input_tokens"] == len(prompt_ids)
    engine = check_engine_spans(spans, http, generated=5)
    prefill_steps = [s for s in spans if s.name == "engine.step" and s.attributes["llm.batch.prefill_tokens"]]
    assert any(s.attributes["llm.batch.prefill_tokens"] == len(prompt_ids) for s in prefill_steps)
    assert engine.attributes["gen_ai.usage.input_tokens"] == len(prompt_ids)
    generated = r.json["generated_text"]
    assert_private(spans, PROMPT, prompt_ids + tokenizer(generated, add_special_tokens=False)["input_ids"])


def test_streamed_request_takes_its_parent_from_sagemaker_custom_attributes(traced: Traced) -> None:
    r = traced.app().test_client().post(
        "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}},
        headers={"X-Amzn-SageMaker-Custom-Attributes": f"user=1; traceparent={TRACEPARENT}; tracestate=a=1,b=2"},
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["x-trace-id"] == TRACE
    spans = traced.spans()
    http = one(spans, "POST /generate_stream")
    assert format(http.parent.span_id, "016x") == PARENT and http.context.trace_state.get("b") == "2"
    assert http.attributes["llm.stream"] is True and http.attributes["gen_ai.usage.output_tokens"] == 4
    check_engine_spans(spans, http, generated=4)


def test_a_request_without_context_starts_a_trace_and_logs_its_id(traced: Traced) -> None:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    access = logging.getLogger("serve.access")
    app = traced.app()  # sets the access logger up first
    access.addHandler(handler)
    try:
        r = app.test_client().post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 3})  # fmt: skip
    finally:
        access.removeHandler(handler)
    assert r.status_code == 200
    http = one(traced.spans(), "POST /v1/chat/completions")
    assert http.parent is None and r.headers["x-trace-id"] == format(http.context.trace_id, "032x")
    assert [json.loads(line)["trace_id"] for line in lines] == [r.headers["x-trace-id"]]
    check_engine_spans(traced.spans(), http, generated=3)


def test_a_caller_that_does_not_sample_gets_no_spans_and_no_step_spans(traced: Traced) -> None:
    """A traceparent with the sampled flag off (parent-based sampling drops the request): nothing is exported, not
    even the step spans of the steps that ran it (a step span exists only for sampled requests)."""
    r = traced.app().test_client().post(
        "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}},
        headers={"traceparent": f"00-{TRACE}-{PARENT}-00"},
    )  # fmt: skip
    assert r.status_code == 200 and r.headers["x-trace-id"] == TRACE
    time.sleep(0.2)  # the engine loop ends its spans after the last event
    assert traced.spans() == []


def test_a_422_is_a_span_with_its_error_type_and_no_engine_work(traced: Traced) -> None:
    r = traced.app().test_client().post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 0}},
                                        headers={"traceparent": TRACEPARENT})  # fmt: skip
    assert r.status_code == 422 and r.headers["x-trace-id"] == TRACE
    spans = traced.spans()
    http = one(spans, "POST /generate")
    assert http.attributes["http.response.status_code"] == 422 and http.attributes["error.type"] == "validation"
    assert http.status.status_code == StatusCode.UNSET  # a client error is not the server's
    assert not [s for s in spans if s.name.startswith("engine.")]


def test_a_refused_key_is_traced_too(traced: Traced) -> None:
    r = traced.app(api_key="secret").test_client().post("/generate", json={"inputs": PROMPT})
    assert r.status_code == 401 and r.headers["x-trace-id"]
    http = one(traced.spans(), "POST /generate")
    assert http.attributes["error.type"] == "authentication" and http.attributes["http.response.status_code"] == 401


def test_a_client_disconnect_ends_both_spans_as_cancelled(traced: Traced, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = traced.served.engine
    real_step = engine.step

    def slow_step() -> list:
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 100}}
    r = traced.app().test_client().post("/generate_stream", json=body, buffered=False)
    frames = iter(r.response)
    for _ in range(3):
        assert next(frames).startswith(b"data:")
    r.close()  # the client went away
    spans = traced.wait_for(lambda spans: any(s.name == "POST /generate_stream" for s in spans)
                            and any(s.name == "engine.request" for s in spans))  # fmt: skip
    http = one(spans, "POST /generate_stream")
    assert http.attributes["error.type"] == "cancelled" and 3 <= http.attributes["gen_ai.usage.output_tokens"] < 100
    engine_span = children(spans, http)["engine.request"]
    assert engine_span.attributes["error.type"] == "cancelled"
    assert {"queue", "prefill", "decode"} == set(children(spans, engine_span))
    assert traced.served.idle()


def test_prompts_are_in_attributes_only_with_log_prompts(traced: Traced) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    assert traced.app().test_client().post("/generate", json=body).status_code == 200
    assert "gen_ai.prompt" not in one(traced.spans(), "POST /generate").attributes
    traced.exporter.clear()
    assert traced.app(log_prompts=True).test_client().post("/generate", json=body).status_code == 200
    assert one(traced.spans(), "POST /generate").attributes["gen_ai.prompt"] == PROMPT


def test_probes_are_not_traced_and_tracing_off_adds_nothing(traced: Traced) -> None:
    assert traced.app().test_client().get("/ping").status_code == 200
    assert traced.spans() == []
    r = (
        traced.served.app()
        .test_client()
        .post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    )
    assert r.status_code == 200 and "x-trace-id" not in r.headers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"traceparent={TRACEPARENT}", {"traceparent": TRACEPARENT}),
        (f"a=1;traceparent={TRACEPARENT};tracestate=x=1,y=2", {"traceparent": TRACEPARENT, "tracestate": "x=1,y=2"}),
        (f"a=1,traceparent={TRACEPARENT}", {"traceparent": TRACEPARENT}),
        ("a=1;tracestate=x=1", {}),
        ("", {}),
    ],
)
def test_custom_attributes_context(value: str, expected: dict[str, str]) -> None:
    assert custom_attributes_context(value) == expected
