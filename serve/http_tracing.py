"""The HTTP request's span in a worker, installed on the flask app only when tracing is on. Its parent is the
caller's W3C `traceparent`/`tracestate` (or a `traceparent=...` entry of SageMaker's custom-attributes header);
its trace id goes back in `x-trace-id` and into the access log line; it ends when the response (or stream) closes,
with a `validate` child (body, validation, tokenization) and the request's counts. Prompts only with LOG_PROMPTS.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from flask import Flask, Response, g, request
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from serve.request_record import RequestRecord
from serve.tracing import Tracing, trace_id_hex, wall_ns

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
TRACE_ID_HEADER = "x-trace-id"


def custom_attributes_context(value: str) -> dict[str, str]:
    """traceparent (and tracestate) from SageMaker's custom attributes: `key=value` entries separated by `;`
    (a tracestate may hold commas), or by `,` when there is no `;` (then only traceparent is read)."""
    found: dict[str, str] = {}
    for entry in value.split(";"):
        key, sep, item = entry.strip().partition("=")
        if sep and key.strip().lower() in ("traceparent", "tracestate"):
            found[key.strip().lower()] = item.strip()
    if "traceparent" not in found and ";" not in value:
        for entry in value.split(","):
            key, sep, item = entry.strip().partition("=")
            if sep and key.strip().lower() == "traceparent":
                found = {"traceparent": item.strip()}
    return found if "traceparent" in found else {}


def incoming_context(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's trace context: the W3C headers, else SageMaker's custom attributes; {} when neither."""
    traceparent = headers.get("traceparent")
    if traceparent:
        carrier = {"traceparent": traceparent}
        if headers.get("tracestate"):
            carrier["tracestate"] = headers["tracestate"]
        return carrier
    return custom_attributes_context(headers.get(CUSTOM_ATTRIBUTES, ""))


class RequestTracing:
    def __init__(self, tracing: Tracing, log_prompts: bool, untraced: Collection[str]) -> None:
        self.tracing, self.log_prompts, self.untraced = tracing, log_prompts, untraced

    def install(self, app: Flask) -> None:
        """Register after the app's own hooks: its record exists when ours run (after_request runs ours first)."""
        app.before_request(self.begin)
        app.after_request(self.end)

    def _start(self, record: RequestRecord) -> None:
        parent = self.tracing.extract(incoming_context(request.headers))
        attributes = {
            "http.request.method": record.method,
            "http.route": record.route,
            "llm.request_id": record.request_id,
        }
        span = self.tracing.tracer.start_span(f"{record.method} {record.route}", context=parent, kind=SpanKind.SERVER,
                                              start_time=wall_ns(record.arrival), attributes=attributes)  # fmt: skip
        g.trace_span = span
        record.trace_id = trace_id_hex(span)
        record.trace_context = self.tracing.inject(span)

    def begin(self) -> None:
        record: RequestRecord | None = g.get("record")
        if record is not None and request.endpoint not in self.untraced:
            self._start(record)

    def end(self, response: Response) -> Response:
        record: RequestRecord | None = g.get("record")
        if record is None or request.endpoint in self.untraced:
            return response
        if g.get("trace_span") is None:  # a hook before ours refused the request (401): trace it all the same
            self._start(record)
        span = g.trace_span
        response.headers[TRACE_ID_HEADER] = record.trace_id or ""
        response.call_on_close(lambda: self.finish(span, record))  # after the app's: the record is complete
        return response

    def finish(self, span: object, record: RequestRecord) -> None:
        """End the span with the request's outcome (the stream's included: this runs when the response closes)."""
        attributes: dict[str, object] = {"http.response.status_code": record.status}
        if record.error_type is not None:
            attributes["error.type"] = record.error_type
        if record.generation:
            attributes.update(
                {
                    "gen_ai.usage.input_tokens": record.prompt_tokens,
                    "gen_ai.usage.output_tokens": record.generated_tokens,
                    "llm.stream": record.stream,
                }
            )
            if record.finish_reason is not None:
                attributes["gen_ai.response.finish_reasons"] = [record.finish_reason]
            if record.ttft_s is not None:
                attributes["llm.time_to_first_token_s"] = record.ttft_s
            if record.queue_s is not None:
                attributes["llm.queue_s"] = record.queue_s
        if self.log_prompts and record.prompt is not None:
            attributes["gen_ai.prompt"] = record.prompt
        span.set_attributes(attributes)  # type: ignore[attr-defined]
        if record.validated is not None:
            child = self.tracing.tracer.start_span("validate", context=set_span_in_context(span),  # type: ignore[arg-type]
                                                   start_time=wall_ns(record.arrival))  # fmt: skip
            child.set_attribute("gen_ai.usage.input_tokens", record.prompt_tokens)
            child.end(end_time=wall_ns(record.arrival + record.validation_s))
        if record.status >= 500:
            span.set_status(Status(StatusCode.ERROR, record.error_type or str(record.status)))  # type: ignore[attr-defined]
        span.end()  # type: ignore[attr-defined]
