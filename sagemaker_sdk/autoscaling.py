"""Target-tracking autoscaling of an endpoint variant's instance count (Application Auto Scaling). The default
signal is the container's own RequestsInFlight (EMF, averaged over instances): for an LLM, concurrent requests
track load far better than invocations per minute; `metric="invocations"` uses SageMaker's predefined
SageMakerVariantInvocationsPerInstance instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sagemaker_sdk.aws import Aws
from serve import emf

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@dataclass(frozen=True)
class ScalingConfig:
    min_instances: int = 1
    max_instances: int = 2
    metric: Literal["concurrency", "invocations"] = "concurrency"
    target: float = 16.0  # in-flight requests per instance (or invocations per instance per minute)
    scale_in_cooldown_s: int = 300
    scale_out_cooldown_s: int = 60

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances or self.max_instances < 1:
            raise ValueError(f"need 0 <= min_instances <= max_instances >= 1, got {self.min_instances}, "
                             f"{self.max_instances}")  # fmt: skip
        if self.metric not in ("concurrency", "invocations") or not self.target > 0:
            raise ValueError(f"metric must be concurrency or invocations and target > 0, got {self.metric}, "
                             f"{self.target}")  # fmt: skip


DEFAULT_SCALING = ScalingConfig()


def resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def policy_name(endpoint: str) -> str:
    return f"{endpoint}-target-tracking"


def policy_configuration(
    endpoint: str, variant: str, config: ScalingConfig, namespace: str = emf.DEFAULT_NAMESPACE
) -> dict[str, Any]:
    """TargetTrackingScalingPolicyConfiguration for PutScalingPolicy."""
    spec: dict[str, Any] = {
        "TargetValue": config.target,
        "ScaleInCooldown": config.scale_in_cooldown_s,
        "ScaleOutCooldown": config.scale_out_cooldown_s,
    }
    if config.metric == "invocations":
        spec["PredefinedMetricSpecification"] = {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}
    else:
        spec["CustomizedMetricSpecification"] = {
            "MetricName": emf.IN_FLIGHT.name,
            "Namespace": namespace,
            "Dimensions": [
                {"Name": emf.ENDPOINT_DIMENSION, "Value": endpoint},
                {"Name": emf.VARIANT_DIMENSION, "Value": variant},
            ],  # fmt: skip
            "Statistic": "Average",
            "Unit": emf.IN_FLIGHT.unit,
        }
    return spec


def enable_autoscaling(
    aws: Aws, endpoint: str, variant: str, config: ScalingConfig = DEFAULT_SCALING,
    namespace: str = emf.DEFAULT_NAMESPACE,
) -> str:  # fmt: skip
    """Register the variant as a scalable target and put the target-tracking policy; returns the policy's name."""
    client = aws.client("application-autoscaling")
    target = dict(ServiceNamespace=NAMESPACE, ResourceId=resource_id(endpoint, variant), ScalableDimension=DIMENSION)
    client.register_scalable_target(**target, MinCapacity=config.min_instances, MaxCapacity=config.max_instances)
    name = policy_name(endpoint)
    client.put_scaling_policy(
        **target, PolicyName=name, PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration=policy_configuration(endpoint, variant, config, namespace),
    )  # fmt: skip
    return name


def disable_autoscaling(aws: Aws, endpoint: str, variant: str) -> None:
    """Deregister the scalable target (its policies go with it); nothing to do when there is none."""
    client = aws.client("application-autoscaling")
    rid = resource_id(endpoint, variant)
    found = client.describe_scalable_targets(ServiceNamespace=NAMESPACE, ResourceIds=[rid], ScalableDimension=DIMENSION)
    if found["ScalableTargets"]:
        client.deregister_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION)
