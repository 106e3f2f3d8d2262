"""OpenTelemetry tracing (the optional `tracing` extra): the config, the exporter (OTLP over gRPC or HTTP/protobuf),
one TracerProvider per process, and the W3C trace context as a plain dict that travels in engine requests.

Off (no OTLP_ENDPOINT) nothing here is imported by the hot path: callers hold `Tracing | None` and skip on None.
The SDK itself still honours the standard OTEL_* variables (sampler, batch processor, headers, resource attributes).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

logger = logging.getLogger(__name__)

GRPC, HTTP = "grpc", "http/protobuf"
PROTOCOLS = (GRPC, HTTP)
DEFAULT_SERVICE_NAME = "sagemaker-llm-server"  # the image's name (Dockerfile, README)
INSTALL_HINT = "pip install 'sagemaker-llm-server[tracing]'"
TRACES_PATH = "/v1/traces"
_PACKAGES = {  # module -> the distribution that provides it
    "opentelemetry.sdk.trace": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter": "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter": "opentelemetry-exporter-otlp-proto-http",
}


@dataclass(frozen=True)
class TracingConfig:
    endpoint: str | None = None  # OTLP_ENDPOINT; None: tracing off
    protocol: str | None = None  # OTEL_EXPORTER_OTLP_PROTOCOL; None: inferred from the endpoint
    service_name: str = DEFAULT_SERVICE_NAME

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None

    @property
    def resolved_protocol(self) -> str:
        return self.protocol or infer_protocol(self.endpoint or "")


def parse_endpoint(raw: str) -> str:
    """An OTLP endpoint URL: http(s)://host[:port][/path] (ValueError otherwise)."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(raw)
    parts.port  # noqa: B018 (raises ValueError on a bad port)
    return raw


def infer_protocol(endpoint: str) -> str:
    """HTTP/protobuf for the OTLP/HTTP port (4318) or a path ending in /v1/traces; else gRPC (TGI's, port 4317)."""
    parts = urlsplit(endpoint)
    if parts.port == 4318 or parts.path.rstrip("/").endswith(TRACES_PATH):
        return HTTP
    return GRPC


def missing_packages(protocol: str) -> list[str]:
    """The distributions that tracing over `protocol` needs and that do not import ([] when all do)."""
    kind = "grpc" if protocol == GRPC else "http"
    missing = []
    for module in ("opentelemetry.sdk.trace", f"opentelemetry.exporter.otlp.proto.{kind}.trace_exporter"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(_PACKAGES[module])
    return missing


def make_exporter(config: TracingConfig) -> SpanExporter:
    """The OTLP exporter for the endpoint; headers, timeouts, TLS files and compression come from OTEL_* (the SDK)."""
    endpoint = config.endpoint or ""
    if config.resolved_protocol == HTTP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        path = urlsplit(endpoint).path.rstrip("/")
        if not path.endswith(TRACES_PATH):  # a collector's base URL: the signal path goes after it (OTLP spec)
            endpoint = endpoint.rstrip("/") + TRACES_PATH
        return HttpExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint, insecure=urlsplit(endpoint).scheme == "http")


class Tracing:
    """One process's tracer. `exporter` replaces the OTLP one (tests: the SDK's InMemorySpanExporter, exported
    synchronously so spans are there as soon as they end)."""

    def __init__(self, config: TracingConfig, role: str, exporter: SpanExporter | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.config = config
        # the sampler comes from OTEL_TRACES_SAMPLER; OTEL_RESOURCE_ATTRIBUTES is merged into the resource
        resource = Resource.create(
            {"service.name": config.service_name, "llm.process": role, "process.pid": os.getpid()}
        )
        self.provider: TracerProvider = TracerProvider(resource=resource)
        if exporter is None:
            self.provider.add_span_processor(BatchSpanProcessor(make_exporter(config)))  # exports off-thread
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("serve")
        self.propagator = TraceContextTextMapPropagator()

    def inject(self, span: Any) -> dict[str, str]:
        """The W3C trace context (traceparent, tracestate) that makes `span` the parent on the other side."""
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=set_span_in_context(span))
        return carrier

    def extract(self, carrier: dict[str, str] | None) -> Context | None:
        """The context a traceparent/tracestate carrier names; None when there is none (or it is malformed)."""
        if not carrier or "traceparent" not in carrier:
            return None
        from opentelemetry.trace import get_current_span

        context = self.propagator.extract(carrier)
        return context if get_current_span(context).get_span_context().is_valid else None

    def flush(self, timeout_s: float = 5.0) -> None:
        self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()


def setup(config: TracingConfig | None, role: str) -> Tracing | None:
    """The process's Tracing when an endpoint is configured, else None (and nothing imported)."""
    if config is None or not config.enabled:
        return None
    tracing = Tracing(config, role)
    logger.info("tracing: %s spans to %s (%s)", role, config.endpoint, config.resolved_protocol)
    return tracing


def wall_ns(at: float) -> int:
    """A REQUEST_CLOCK (time.monotonic) value as the epoch nanoseconds spans take."""
    return int(at * 1e9) + time.time_ns() - time.monotonic_ns()


def trace_id_hex(span: Any) -> str:
    return format(span.get_span_context().trace_id, "032x")
