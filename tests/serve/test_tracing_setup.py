"""Tracing's settings and exporters: OTLP_ENDPOINT / OTLP_SERVICE_NAME / the protocol through the settings registry,
the protocol inferred from the URL, spans really delivered over gRPC and over HTTP/protobuf to receivers on loopback,
and, without the `tracing` extra, a one-line start-up error saying what to install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from container.settings import load_settings
from serve.tracing import GRPC, HTTP, Tracing, TracingConfig, infer_protocol, missing_packages
from tests.support.otlp_receiver import GrpcReceiver, HttpReceiver
from tests.support.serve_process import ROOT, base_env


@pytest.mark.parametrize(
    ("url", "protocol"),
    [
        ("http://collector:4317", GRPC),
        ("https://collector.example.com", GRPC),
        ("http://collector:4318", HTTP),
        ("https://otlp.example.com/v1/traces", HTTP),
        ("http://127.0.0.1:9999/otlp/v1/traces/", HTTP),
    ],
)
def test_protocol_is_inferred_from_the_url(url: str, protocol: str) -> None:
    assert infer_protocol(url) == protocol


def test_settings(tmp_path: Path) -> None:
    base = {"SM_OPT_ML_DIR": str(tmp_path), "HF_MODEL_ID": "org/model"}
    off = load_settings(base).tracing
    assert not off.enabled and off.service_name == "sagemaker-llm-server"
    on = load_settings({**base, "OTLP_ENDPOINT": "http://collector:4318", "OTLP_SERVICE_NAME": "tgi-a"}).tracing
    assert on == TracingConfig("http://collector:4318", None, "tgi-a") and on.resolved_protocol == HTTP
    standard = {**base, "OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_SERVICE_NAME": "svc"}  # fmt: skip
    assert load_settings(standard).tracing == TracingConfig("http://collector:4318", GRPC, "svc")
    assert load_settings(standard).tracing.resolved_protocol == GRPC
    assert missing_packages(GRPC) == [] and missing_packages(HTTP) == []  # the dev extra includes `tracing`


def _export_one(config: TracingConfig) -> None:
    tracing = Tracing(config, "test")  # the real BatchSpanProcessor and OTLP exporter
    tracing.tracer.start_span("probe", attributes={"n": 1}).end()
    tracing.shutdown()  # flushes


def test_spans_reach_a_grpc_receiver() -> None:
    with GrpcReceiver() as receiver:
        _export_one(TracingConfig(receiver.url, None, "svc-grpc"))  # http://127.0.0.1:<port>: inferred gRPC
        (span,) = receiver.wait_for(lambda spans: len(spans) == 1)
    assert span.name == "probe" and span.attributes == {"n": 1} and span.resource["service.name"] == "svc-grpc"


def test_spans_reach_an_http_receiver_given_its_base_url() -> None:
    with HttpReceiver() as receiver:
        base = receiver.url.removesuffix("/v1/traces")  # the exporter adds the signal path
        _export_one(TracingConfig(base, HTTP, "svc-http"))
        (span,) = receiver.wait_for(lambda spans: len(spans) == 1)
    assert (
        span.name == "probe" and span.resource["service.name"] == "svc-http" and span.resource["llm.process"] == "test"
    )


BLOCKED = """
import sys
for name in ("opentelemetry.sdk", "opentelemetry.exporter"):  # as if the `tracing` extra were not installed
    sys.modules[name] = None
from container.launcher import main
main()
"""


@pytest.mark.integration
def test_without_the_extra_an_endpoint_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    env = base_env(SM_OPT_ML_DIR=str(tmp_path), OTLP_ENDPOINT="http://127.0.0.1:4317")
    result = subprocess.run([sys.executable, "-c", BLOCKED], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (
        "error: OTLP_ENDPOINT needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-grpc, which are not "
        "installed: pip install 'sagemaker-llm-server[tracing]'"
    )
