"""A CloudWatch dashboard for one endpoint variant: SageMaker's invocation, latency and error metrics
(AWS/SageMaker), the instances' CPU/GPU/memory (/aws/sagemaker/Endpoints), and the container's own EMF metrics.
"""

from __future__ import annotations

import json
from typing import Any

from sagemaker_sdk.aws import Aws
from serve import emf

SAGEMAKER = "AWS/SageMaker"
INSTANCES = "/aws/sagemaker/Endpoints"
PERIOD = 60
WIDTH, HEIGHT = 12, 6


def metric(namespace: str, name: str, endpoint: str, variant: str, **options: Any) -> list[Any]:
    """One line of a metric widget: namespace, name, the endpoint's dimensions, then rendering options."""
    line: list[Any] = [namespace, name, emf.ENDPOINT_DIMENSION, endpoint, emf.VARIANT_DIMENSION, variant]
    return [*line, options] if options else line


def _widget(title: str, metrics: list[list[Any]], region: str, stat: str, label: str | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "title": title, "region": region, "metrics": metrics, "view": "timeSeries", "stat": stat, "period": PERIOD,
    }  # fmt: skip
    if label:
        properties["yAxis"] = {"left": {"label": label, "min": 0}}
    return {"type": "metric", "properties": properties}


def dashboard_body(endpoint: str, variant: str, region: str, namespace: str = emf.DEFAULT_NAMESPACE) -> dict[str, Any]:
    def sm(name: str, **options: Any) -> list[Any]:
        return metric(SAGEMAKER, name, endpoint, variant, **options)

    def host(name: str, **options: Any) -> list[Any]:
        return metric(INSTANCES, name, endpoint, variant, **options)

    def ours(spec: emf.MetricSpec, **options: Any) -> list[Any]:
        return metric(namespace, spec.name, endpoint, variant, **options)

    def percentiles(spec: emf.MetricSpec) -> list[list[Any]]:
        return [ours(spec, stat=p, label=f"{spec.name} {p}") for p in ("p50", "p90", "p99")]

    widgets = [
        _widget(
            "Invocations and errors",
            [sm("Invocations"), sm("Invocation4XXErrors"), sm("Invocation5XXErrors"), sm("InvocationModelErrors")],
            region,
            "Sum",
            "count / min",
        ),  # fmt: skip
        _widget(
            "Model latency (us)",
            [sm("ModelLatency", stat=p, label=f"ModelLatency {p}") for p in ("p50", "p90", "p99")]
            + [sm("OverheadLatency", stat="p90", label="OverheadLatency p90")],
            region,
            "p90",
        ),  # fmt: skip
        _widget("Time to first token (ms)", percentiles(emf.TIME_TO_FIRST_TOKEN), region, "p50", "ms"),
        _widget("Inter-token latency (ms)", percentiles(emf.INTER_TOKEN_LATENCY), region, "p50", "ms"),
        _widget(
            "Generated tokens/s (all instances)",
            [
                ours(emf.GENERATED_TOKENS, id="tokens", visible=False),
                [{"expression": f"tokens / {PERIOD}", "label": "generated tokens/s", "id": "rate"}],
                ours(emf.TOKENS_PER_SECOND, stat="Average", label="per instance (average)"),
            ],
            region,
            "Sum",
            "tokens/s",
        ),  # fmt: skip
        _widget(
            "Queue and running batch",
            [ours(emf.QUEUE_SIZE), ours(emf.BATCH_SIZE), ours(emf.IN_FLIGHT)],
            region,
            "Maximum",
            "requests",
        ),  # fmt: skip
        _widget(
            "KV-cache usage (%)",
            [ours(emf.KV_CACHE_USAGE, stat=s, label=s) for s in ("Maximum", "Average")],
            region,
            "Maximum",
        ),  # fmt: skip
        _widget("Requests by outcome", [ours(spec) for spec in emf.OUTCOMES], region, "Sum", "count / min"),
        _widget(
            "Instance CPU / memory / disk (%)",
            [host("CPUUtilization"), host("MemoryUtilization"), host("DiskUtilization")],
            region,
            "Average",
        ),  # fmt: skip
        _widget(
            "Instance GPU / GPU memory (%)", [host("GPUUtilization"), host("GPUMemoryUtilization")], region, "Average"
        ),  # fmt: skip
    ]
    for i, widget in enumerate(widgets):
        widget.update(x=(i % 2) * WIDTH, y=(i // 2) * HEIGHT, width=WIDTH, height=HEIGHT)
    return {"widgets": widgets}


def create_dashboard(
    aws: Aws, endpoint: str, variant: str, namespace: str = emf.DEFAULT_NAMESPACE, name: str | None = None
) -> str:
    """Create (or replace) the dashboard; returns its name (the endpoint's name unless given)."""
    name = name or endpoint
    body = dashboard_body(endpoint, variant, aws.region, namespace)
    aws.client("cloudwatch").put_dashboard(DashboardName=name, DashboardBody=json.dumps(body))
    return name
