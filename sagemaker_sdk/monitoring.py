"""Day-one observability for a deployed endpoint in one call: dashboard, alarms and autoscaling, set up from what
SageMaker says the endpoint is (variant, instance type, the container's CloudWatch namespace); and their removal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sagemaker_sdk.alarms import DEFAULT_THRESHOLDS, AlarmThresholds, alarm_names, create_alarms
from sagemaker_sdk.autoscaling import DEFAULT_SCALING, ScalingConfig, disable_autoscaling, enable_autoscaling
from sagemaker_sdk.aws import Aws, describe
from sagemaker_sdk.dashboard import create_dashboard
from sagemaker_sdk.instances import gpu_count
from serve import emf


@dataclass(frozen=True)
class Monitoring:
    dashboard: str | None
    alarms: list[str]
    scaling_policy: str | None


def monitor(
    endpoint_name: str,
    aws: Aws | None = None,
    *,
    dashboard: bool = True,
    alarms: bool = True,
    autoscaling: ScalingConfig | None = DEFAULT_SCALING,
    thresholds: AlarmThresholds = DEFAULT_THRESHOLDS,
    alarm_actions: Sequence[str] = (),
) -> Monitoring:
    """Create the dashboard, the alarms and target-tracking autoscaling (None: no autoscaling) for an endpoint."""
    aws = aws or Aws()
    parts = describe(aws, endpoint_name)
    model = aws.client("sagemaker").describe_model(ModelName=parts.model_name)
    env = model.get("PrimaryContainer", {}).get("Environment", {})
    namespace = env.get("CLOUDWATCH_NAMESPACE") or emf.DEFAULT_NAMESPACE
    gpus = gpu_count(parts.instance_type) if parts.instance_type else 0
    if gpus is None:  # an instance type we do not know: trust what the deployment shards over
        gpus = int(env.get("SM_NUM_GPUS") or 1)
    variant = parts.variant_name
    return Monitoring(
        dashboard=create_dashboard(aws, endpoint_name, variant, namespace) if dashboard else None,
        alarms=create_alarms(aws, endpoint_name, variant, gpus, thresholds, alarm_actions) if alarms else [],
        scaling_policy=enable_autoscaling(aws, endpoint_name, variant, autoscaling, namespace) if autoscaling else None,
    )


def remove_monitoring(aws: Aws, endpoint_name: str, variant_name: str) -> None:
    """Remove what `monitor` created (whatever of it exists)."""
    disable_autoscaling(aws, endpoint_name, variant_name)
    cloudwatch = aws.client("cloudwatch")
    existing = cloudwatch.describe_alarms(AlarmNames=alarm_names(endpoint_name))["MetricAlarms"]
    if existing:
        cloudwatch.delete_alarms(AlarmNames=[alarm["AlarmName"] for alarm in existing])
    dashboards = cloudwatch.list_dashboards(DashboardNamePrefix=endpoint_name)["DashboardEntries"]
    if any(entry["DashboardName"] == endpoint_name for entry in dashboards):
        cloudwatch.delete_dashboards(DashboardNames=[endpoint_name])
