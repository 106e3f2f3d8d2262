"""deploy / delete / monitor against moto's SageMaker, CloudWatch and Application Auto Scaling (no AWS): what
SageMaker records for the model (our image, the exact environment), the endpoint config (instance type, count,
health-check timeout, async config) and the endpoint; what deletion removes; the dashboard, alarms and scaling
policy bodies. moto lacks ml.g5/g6/p4d, so these deploy to ml.g4dn.
"""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from sagemaker_sdk import AsyncLLMPredictor, Aws, LLMDeployment, LLMPredictor, deploy, monitor
from sagemaker_sdk.alarms import alarm_names
from sagemaker_sdk.dashboard import dashboard_body
from sagemaker_sdk.environment import EnvironmentValidationError
from serve import emf
from tests.sagemaker_sdk.fakes import IMAGE, REGION, ROLE

pytestmark = pytest.mark.slow

SAGEMAKER_SDK_ENV = {  # what HuggingFaceModel adds to every container environment
    "SAGEMAKER_PROGRAM": "", "SAGEMAKER_SUBMIT_DIRECTORY": "", "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
    "SAGEMAKER_REGION": REGION,
}  # fmt: skip


def _records(aws: Aws, endpoint: str) -> tuple[dict, dict, dict]:
    sm = aws.client("sagemaker")
    described = sm.describe_endpoint(EndpointName=endpoint)
    config = sm.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    return described, config, model


def test_deploy_then_monitor_then_delete(aws: Aws) -> None:
    spec = LLMDeployment(
        "ml.g4dn.12xlarge", IMAGE, ROLE, model_id="meta-llama/Llama-3.1-8B-Instruct", endpoint_name="llama-8b",
        max_total_tokens=4096, env={"MAX_BATCH_PREFILL_TOKENS": "2048"}, instance_count=2,
        metrics_namespace="Team/LLM",
    )  # fmt: skip
    plan = spec.plan()
    predictor = spec.deploy(aws, poll_s=0.05)
    assert isinstance(predictor, LLMPredictor) and predictor.endpoint_name == "llama-8b"
    described, config, model = _records(aws, "llama-8b")
    assert described["EndpointStatus"] == "InService"
    assert model["PrimaryContainer"]["Image"] == IMAGE and model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Environment"] == {**plan.env, **SAGEMAKER_SDK_ENV}
    assert plan.env == {
        "HF_MODEL_ID": "meta-llama/Llama-3.1-8B-Instruct", "SM_NUM_GPUS": "4", "MAX_TOTAL_TOKENS": "4096",
        "CLOUDWATCH_ENDPOINT_NAME": "llama-8b", "CLOUDWATCH_VARIANT_NAME": "AllTraffic",
        "CLOUDWATCH_NAMESPACE": "Team/LLM", "MAX_BATCH_PREFILL_TOKENS": "2048",
    }  # fmt: skip
    (variant,) = config["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g4dn.12xlarge" and variant["InitialInstanceCount"] == 2
    assert variant["VariantName"] == "AllTraffic" and variant["ModelName"] == model["ModelName"]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == plan.health_check_timeout_s == 460
    assert "AsyncInferenceConfig" not in config or not config["AsyncInferenceConfig"]
    _monitor_then_delete(aws, predictor)


def _monitor_then_delete(aws: Aws, predictor: LLMPredictor) -> None:
    name, dims = "llama-8b", {"EndpointName": "llama-8b", "VariantName": "AllTraffic"}
    result = monitor(name, aws)
    cloudwatch, scaling = aws.client("cloudwatch"), aws.client("application-autoscaling")

    body = json.loads(cloudwatch.get_dashboard(DashboardName=result.dashboard)["DashboardBody"])
    assert result.dashboard == name and body == dashboard_body(name, "AllTraffic", REGION, "Team/LLM")
    lines = [m for w in body["widgets"] for m in w["properties"]["metrics"] if isinstance(m[0], str)]
    shown = {(m[0], m[1]) for m in lines}
    sagemaker = {("AWS/SageMaker", m) for m in ("Invocations", "Invocation5XXErrors", "ModelLatency")}
    hosts = {("/aws/sagemaker/Endpoints", m) for m in ("CPUUtilization", "MemoryUtilization", "GPUMemoryUtilization")}
    ours = {
        ("Team/LLM", spec.name)
        for spec in (
            emf.TIME_TO_FIRST_TOKEN,
            emf.INTER_TOKEN_LATENCY,
            emf.KV_CACHE_USAGE,
            emf.QUEUE_SIZE,
            emf.BATCH_SIZE,
            emf.GENERATED_TOKENS,
            *emf.OUTCOMES,
        )
    }
    assert sagemaker | hosts | ours <= shown
    assert all(m[2:6] == ["EndpointName", name, "VariantName", "AllTraffic"] for m in lines)
    widgets = body["widgets"]
    cells = [(w["x"] + dx, w["y"] + dy) for w in widgets for dx in range(w["width"]) for dy in range(w["height"])]
    assert len(cells) == len(set(cells)) and all(x < 24 for x, _ in cells)  # CloudWatch's 24-column grid, no overlap

    alarms = {a["AlarmName"]: a for a in cloudwatch.describe_alarms(AlarmNames=alarm_names(name))["MetricAlarms"]}
    assert sorted(alarms) == sorted(result.alarms) == sorted(alarm_names(name))
    rate = alarms["llama-8b-5xx-error-rate"]
    queries = {q["Id"]: q for q in rate["Metrics"]}
    assert queries["rate"]["Expression"] == "IF(invocations > 0, 100 * errors / invocations, 0)"
    assert queries["errors"]["MetricStat"]["Metric"]["MetricName"] == "Invocation5XXErrors" and rate["Threshold"] == 5
    latency = alarms["llama-8b-model-latency-p90"]
    assert (latency["MetricName"], latency["ExtendedStatistic"], latency["Threshold"]) == ("ModelLatency", "p90", 3e7)
    gpu = alarms["llama-8b-gpu-memory"]
    assert (gpu["Namespace"], gpu["MetricName"]) == ("/aws/sagemaker/Endpoints", "GPUMemoryUtilization")
    assert gpu["Threshold"] == 97 * 4 and {d["Name"]: d["Value"] for d in gpu["Dimensions"]} == dims

    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["ResourceId"] == "endpoint/llama-8b/variant/AllTraffic"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 2)
    (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyName"] == result.scaling_policy and policy["PolicyType"] == "TargetTrackingScaling"
    metric = config["CustomizedMetricSpecification"]
    assert (metric["Namespace"], metric["MetricName"], metric["Statistic"]) == ("Team/LLM", "RequestsInFlight",
                                                                                 "Average")  # fmt: skip
    assert {d["Name"]: d["Value"] for d in metric["Dimensions"]} == dims
    assert config["TargetValue"] == 16 and config["ScaleInCooldown"] == 300

    predictor.delete()
    sm = aws.client("sagemaker")
    for call, kwargs in ((sm.describe_endpoint, {"EndpointName": name}),
                         (sm.describe_endpoint_config, {"EndpointConfigName": name}),
                         (sm.describe_model, {"ModelName": name})):  # fmt: skip
        with pytest.raises(ClientError):
            call(**kwargs)
    assert cloudwatch.describe_alarms(AlarmNames=alarm_names(name))["MetricAlarms"] == []
    assert cloudwatch.list_dashboards()["DashboardEntries"] == []
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_deploy_s3_model_for_async_inference(aws: Aws) -> None:
    from sagemaker.async_inference import AsyncInferenceConfig  # here: after the fixture silenced its v2 notice

    async_config = AsyncInferenceConfig(output_path="s3://results/llm", max_concurrent_invocations_per_instance=4)
    predictor = deploy(
        model_data="s3://models/llm/model.tar.gz", instance_type="ml.g4dn.xlarge", image_uri=IMAGE, role=ROLE,
        endpoint_name="async-llm", model_size_b=70, async_inference=async_config, aws=aws, poll_s=0.05,
    )  # fmt: skip
    assert isinstance(predictor, AsyncLLMPredictor)
    _, config, model = _records(aws, "async-llm")
    container = model["PrimaryContainer"]
    assert container["ModelDataUrl"] == "s3://models/llm/model.tar.gz"
    assert container["Environment"]["HF_MODEL_ID"] == "/opt/ml/model" and container["Environment"]["SM_NUM_GPUS"] == "1"
    (variant,) = config["ProductionVariants"]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1700
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 1700
    assert config["AsyncInferenceConfig"]["OutputConfig"] == {
        "S3OutputPath": "s3://results/llm", "S3FailurePath": "s3://results/async-endpoint-failures/async-llm"
    }  # fmt: skip
    assert async_config.failure_path is None  # the caller's config is left alone
    assert config["AsyncInferenceConfig"]["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": 4}


def test_a_bad_environment_creates_nothing(aws: Aws) -> None:
    with pytest.raises(EnvironmentValidationError, match="MAX_TOTAL_TOKENS: must be a positive integer"):
        deploy("org/model", instance_type="ml.g4dn.xlarge", image_uri=IMAGE, role=ROLE,
               env={"MAX_TOTAL_TOKENS": "lots"}, aws=aws)  # fmt: skip
    sm = aws.client("sagemaker")
    assert sm.list_models()["Models"] == [] and sm.list_endpoints()["Endpoints"] == []


def test_cpu_instances_get_no_gpu_alarm_and_invocation_scaling(aws: Aws) -> None:
    from sagemaker_sdk import ScalingConfig

    deploy(instance_type="ml.m5.xlarge", image_uri=IMAGE, role=ROLE, endpoint_name="cpu", aws=aws, poll_s=0.05)
    _, _, model = _records(aws, "cpu")
    assert "SM_NUM_GPUS" not in model["PrimaryContainer"]["Environment"]  # embedded default model, one shard
    assert "HF_MODEL_ID" not in model["PrimaryContainer"]["Environment"]
    result = monitor("cpu", aws, autoscaling=ScalingConfig(1, 4, "invocations", 120))
    assert result.alarms == ["cpu-5xx-error-rate", "cpu-model-latency-p90"]
    (policy,) = aws.client("application-autoscaling").describe_scaling_policies(ServiceNamespace="sagemaker")[
        "ScalingPolicies"
    ]
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["PredefinedMetricSpecification"] == {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}
    assert config["TargetValue"] == 120
    LLMPredictor("cpu", aws).delete(monitoring=True)
    assert aws.client("sagemaker").list_endpoints()["Endpoints"] == []
