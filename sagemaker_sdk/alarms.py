"""CloudWatch alarms for one endpoint variant: the 5xx error rate (metric math over AWS/SageMaker), model latency
p90, and GPU memory. The engine reserves `gpu_memory_utilization` (90%) of each GPU for weights and KV cache at
start-up, so GPU memory sits near 90% by design: the default threshold is above it (per GPU, as SageMaker sums
GPUMemoryUtilization over an instance's GPUs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagemaker_sdk.aws import Aws
from sagemaker_sdk.dashboard import INSTANCES, SAGEMAKER
from serve import emf

PERIOD = 60


@dataclass(frozen=True)
class AlarmThresholds:
    error_rate_percent: float = 5.0  # Invocation5XXErrors / Invocations
    model_latency_p90_ms: float = 30_000.0  # ModelLatency itself is in microseconds
    gpu_memory_percent: float = 97.0  # per GPU
    evaluation_periods: int = 5
    datapoints_to_alarm: int = 3


DEFAULT_THRESHOLDS = AlarmThresholds()


def alarm_names(endpoint: str) -> list[str]:
    return [f"{endpoint}-5xx-error-rate", f"{endpoint}-model-latency-p90", f"{endpoint}-gpu-memory"]


def _dimensions(endpoint: str, variant: str) -> list[dict[str, str]]:
    return [{"Name": emf.ENDPOINT_DIMENSION, "Value": endpoint}, {"Name": emf.VARIANT_DIMENSION, "Value": variant}]


def _stat(query_id: str, namespace: str, name: str, dims: list[dict[str, str]]) -> dict[str, Any]:
    metric = {"Namespace": namespace, "MetricName": name, "Dimensions": dims}
    return {"Id": query_id, "MetricStat": {"Metric": metric, "Period": PERIOD, "Stat": "Sum"}, "ReturnData": False}


def alarm_requests(
    endpoint: str, variant: str, num_gpus: int, thresholds: AlarmThresholds = DEFAULT_THRESHOLDS,
    actions: Sequence[str] = (),
) -> list[dict[str, Any]]:  # fmt: skip
    """The PutMetricAlarm requests. `num_gpus` 0 (a CPU instance) leaves out the GPU memory alarm."""
    dims = _dimensions(endpoint, variant)
    names = alarm_names(endpoint)
    common = {
        "EvaluationPeriods": thresholds.evaluation_periods, "DatapointsToAlarm": thresholds.datapoints_to_alarm,
        "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching",
        "AlarmActions": list(actions), "OKActions": list(actions),
    }  # fmt: skip
    requests = [
        {
            "AlarmName": names[0],
            "AlarmDescription": f"5xx responses above {thresholds.error_rate_percent}% of invocations on {endpoint}",
            "Metrics": [
                _stat("invocations", SAGEMAKER, "Invocations", dims),
                _stat("errors", SAGEMAKER, "Invocation5XXErrors", dims),
                {
                    "Id": "rate",
                    "Expression": "IF(invocations > 0, 100 * errors / invocations, 0)",
                    "Label": "5xx error rate (%)",
                    "ReturnData": True,
                },  # fmt: skip
            ],
            "Threshold": thresholds.error_rate_percent,
            **common,
        },
        {
            "AlarmName": names[1],
            "AlarmDescription": f"ModelLatency p90 above {thresholds.model_latency_p90_ms:g} ms on {endpoint}",
            "Namespace": SAGEMAKER,
            "MetricName": "ModelLatency",
            "Dimensions": dims,
            "ExtendedStatistic": "p90",
            "Period": PERIOD,
            "Unit": "Microseconds",
            "Threshold": thresholds.model_latency_p90_ms * 1000,
            **common,
        },  # fmt: skip
    ]
    if num_gpus > 0:
        requests.append({
            "AlarmName": names[2],
            "AlarmDescription": f"GPU memory above {thresholds.gpu_memory_percent}% per GPU ({num_gpus}) on {endpoint}",
            "Namespace": INSTANCES, "MetricName": "GPUMemoryUtilization", "Dimensions": dims, "Statistic": "Maximum",
            "Period": PERIOD, "Threshold": thresholds.gpu_memory_percent * num_gpus,
            **common,
        })  # fmt: skip
    return requests


def create_alarms(
    aws: Aws, endpoint: str, variant: str, num_gpus: int, thresholds: AlarmThresholds = DEFAULT_THRESHOLDS,
    actions: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """Create (or update) the alarms; returns their names. `actions`: SNS topic ARNs to notify."""
    cloudwatch = aws.client("cloudwatch")
    requests = alarm_requests(endpoint, variant, num_gpus, thresholds, actions)
    for request in requests:
        cloudwatch.put_metric_alarm(**request)
    return [request["AlarmName"] for request in requests]
