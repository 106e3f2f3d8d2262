"""Tracing on a real `serve` (launcher, engine process, gunicorn worker) exporting OTLP/HTTP to a receiver on
loopback: a non-streamed, a streamed, a 422 and a disconnected request; the engine's spans join each request's
trace across the process boundary; attributes; no prompt text or token ids; the trace id in the response header
and in the access log line. OTEL_BSP_SCHEDULE_DELAY (the SDK's own variable) makes the exports quick.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from tests.support.otlp_receiver import HttpReceiver, ReceivedSpan
from tests.support.serve_process import running_serve, write_chain_model

pytestmark = pytest.mark.integration
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
PROMPT = "é東京"  # the chain model continues it with the bytes of é東京😀, over and over


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chain_model(tmp_path_factory.mktemp("trace_model") / "model")


def post(port: int, path: str, body: dict, headers: dict[str, str], read_lines: int | None = None) -> tuple[int, dict]:
    """POST and read the whole answer; with `read_lines`, hang up after that many `data:` lines."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    answer = dict(response.getheaders())
    if read_lines is None:
        response.read()
    else:
        seen = 0
        while seen < read_lines:
            line = response.readline()
            assert line, "the stream ended early"
            seen += line.startswith(b"data:")
        conn.sock.close()  # the client goes away mid-stream
    conn.close()
    return response.status, answer


def by_trace(spans: list[ReceivedSpan], trace_id: str) -> dict[str, list[ReceivedSpan]]:
    found: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        if s.trace_id == trace_id:
            found.setdefault(s.name, []).append(s)
    return found


def test_spans_cross_from_the_worker_into_the_engine_process(model: Path, tmp_path: Path) -> None:
    generate = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}
    long_stream = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1500}}
    extra = dict(OTEL_BSP_SCHEDULE_DELAY="100", MAX_TOTAL_TOKENS="2048")
    with HttpReceiver() as receiver, running_serve(model, tmp_path, OTLP_ENDPOINT=receiver.url, **extra) as s:
        plain = post(s.port, "/generate", generate, {"traceparent": f"00-{TRACE}-{PARENT}-01"})
        custom = {"X-Amzn-SageMaker-Custom-Attributes": f"traceparent=00-{TRACE[::-1]}-{PARENT}-01"}
        streamed = post(s.port, "/generate_stream", generate, custom)
        invalid = post(s.port, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 0}}, {})
        gone = post(s.port, "/generate_stream", long_stream, {}, read_lines=2)
        ids = [answer["x-trace-id"] for _, answer in (plain, streamed, invalid, gone)]
        assert [status for status, _ in (plain, streamed, invalid, gone)] == [200, 200, 422, 200]
        assert ids[0] == TRACE and ids[1] == TRACE[::-1] and len(set(ids)) == 4

        def complete(spans: list[ReceivedSpan]) -> bool:
            names = [by_trace(spans, trace) for trace in ids]
            return all("POST /generate" in n or "POST /generate_stream" in n for n in names) and all(
                "engine.request" in n for n in (names[0], names[1], names[3])
            )

        spans = receiver.wait_for(complete)
        log = s.log()
    workers = {s.resource["process.pid"] for s in spans if s.resource["llm.process"] == "worker"}
    engines = {s.resource["process.pid"] for s in spans if s.resource["llm.process"] == "engine"}
    assert len(workers) == 1 and len(engines) == 1 and workers != engines  # two processes, one trace
    assert {s.resource["service.name"] for s in spans} == {"sagemaker-llm-server"}  # the default: the image's name

    for trace, route, generated in ((ids[0], "POST /generate", 6), (ids[1], "POST /generate_stream", 6)):
        found = by_trace(spans, trace)
        (request,) = found[route]
        assert request.parent_span_id == PARENT and request.resource["llm.process"] == "worker"
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["gen_ai.usage.output_tokens"] == generated
        assert request.attributes["gen_ai.response.finish_reasons"] == ("length",)
        (engine,) = found["engine.request"]
        assert engine.parent_span_id == request.span_id and engine.resource["llm.process"] == "engine"
        assert engine.attributes["gen_ai.usage.output_tokens"] == generated
        assert {n for n in found if n in ("queue", "prefill", "decode", "validate")} == {"queue", "prefill", "decode",
                                                                                      "validate"}  # fmt: skip
        assert all(p.parent_span_id == engine.span_id for n in ("queue", "prefill", "decode") for p in found[n])
        assert request.start_ns <= engine.start_ns and engine.end_ns <= request.end_ns
        steps = [s for s in spans if s.name == "engine.step" and (trace, engine.span_id) in s.links]
        assert len(steps) == generated and all(s.parent_span_id == "" for s in steps)
        assert sum(s.attributes["llm.batch.prefill_tokens"] for s in steps) > 0

    (refused,) = by_trace(spans, ids[2])["POST /generate"]
    assert refused.attributes["http.response.status_code"] == 422 and refused.attributes["error.type"] == "validation"
    assert set(by_trace(spans, ids[2])) == {"POST /generate"}  # no engine work for an invalid request

    found = by_trace(spans, ids[3])
    (request,) = found["POST /generate_stream"]
    assert request.attributes["error.type"] == "cancelled" and request.parent_span_id == ""
    (engine,) = found["engine.request"]
    assert engine.attributes["error.type"] == "cancelled" and engine.parent_span_id == request.span_id
    assert engine.attributes["gen_ai.usage.input_tokens"] > 0 and "gen_ai.usage.output_tokens" not in engine.attributes

    for span in spans:  # neither the prompt nor token ids, without LOG_PROMPTS
        for key, value in span.attributes.items():
            assert not (isinstance(value, str) and ("é" in value or "東" in value)), key
            assert not (isinstance(value, tuple) and value and all(isinstance(v, int) for v in value)), key
    traced_lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"id"')]
    assert sorted(line["trace_id"] for line in traced_lines) == sorted(ids)
