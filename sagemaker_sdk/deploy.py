"""Deploy the container to a SageMaker endpoint with the sagemaker 2.x SDK: `HuggingFaceModel(image_uri=...,
env=...).deploy(...)` with a validated environment, a start-up health-check timeout that grows with the model's
size, and optionally async inference (AsyncInferenceConfig) for generations beyond the 60 s real-time limit.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagemaker_sdk.async_predictor import AsyncLLMPredictor, split_s3
from sagemaker_sdk.aws import Aws
from sagemaker_sdk.environment import container_environment
from sagemaker_sdk.instances import resolve_gpus
from sagemaker_sdk.predictor import LLMPredictor

VARIANT = "AllTraffic"  # HuggingFaceModel.deploy's variant name
HEALTH_CHECK_BASE_S, HEALTH_CHECK_PER_BILLION_S, HEALTH_CHECK_MAX_S = 300, 20, 3600  # 3600: SageMaker's maximum
HEALTH_CHECK_UNKNOWN_SIZE_S = 900
WAIT_LIMIT_S = 4 * 3600
_ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_SIZE = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)


class DeployError(RuntimeError):
    """The endpoint did not come up (SageMaker's FailureReason in the message)."""


def parameters_in_billions(model_id: str | None) -> float | None:
    """The size a hub id states: 'Llama-3.1-8B-Instruct' -> 8, 'Mixtral-8x7B' -> 56, 'SmolLM2-135M' -> 0.135."""
    if not model_id:
        return None
    found = _SIZE.findall(model_id.rsplit("/", 1)[-1])
    if not found:
        return None
    experts, number, unit = found[-1]
    size = float(number) * (int(experts) if experts else 1)
    return size if unit.lower() == "b" else size / 1000


def health_check_timeout(model_size_b: float | None) -> int:
    """Seconds SageMaker waits for the first healthy /ping: download + load + warm-up, ~20 s per billion
    parameters over a 300 s base, up to SageMaker's 3600 s; 900 s when the size is unknown."""
    if model_size_b is None:
        return HEALTH_CHECK_UNKNOWN_SIZE_S
    return int(min(HEALTH_CHECK_MAX_S, HEALTH_CHECK_BASE_S + HEALTH_CHECK_PER_BILLION_S * max(model_size_b, 0.0)))


def endpoint_name_for(model_id: str | None, now: float | None = None) -> str:
    """'llm-<model>-<UTC time to the millisecond>', within SageMaker's 63 characters."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    base = re.sub(r"[^a-zA-Z0-9]+", "-", (model_id or "default").rsplit("/", 1)[-1]).strip("-").lower()
    return f"llm-{base[:38].strip('-') or 'model'}-{stamp}"


@dataclass(frozen=True)
class DeploymentPlan:
    endpoint_name: str
    env: dict[str, str]
    health_check_timeout_s: int
    num_gpus: int


@dataclass(frozen=True)
class LLMDeployment:
    """What to deploy. `model_id` is a hub id (or a path inside the image); `model_data` an S3 model.tar.gz (or
    prefix) that SageMaker unpacks into /opt/ml/model; neither: the image's embedded default model."""

    instance_type: str
    image_uri: str
    role: str
    model_id: str | None = None
    model_data: str | None = None
    endpoint_name: str | None = None
    num_gpus: int | None = None  # None: the instance type's GPUs
    quantize: str | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # more container variables
    force_env: bool = False  # let through variables the container does not know
    instance_count: int = 1
    model_size_b: float | None = None  # billions of parameters; None: read from model_id when it says
    health_check_timeout_s: int | None = None  # None: from the model's size
    async_inference: Any = None  # sagemaker.async_inference.AsyncInferenceConfig
    metrics: bool = True  # the container's CloudWatch EMF metrics
    metrics_namespace: str | None = None
    tags: list[dict[str, str]] | None = None

    def plan(self) -> DeploymentPlan:
        """Everything decided before calling AWS (raises on a bad value, nothing created)."""
        name = self.endpoint_name or endpoint_name_for(self.model_id)
        if not _ENDPOINT_NAME.match(name):
            raise ValueError(f"endpoint_name must be 1-63 letters, digits and hyphens, got {name!r}")
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be at least 1, got {self.instance_count}")
        gpus = resolve_gpus(self.instance_type, self.num_gpus)
        env = container_environment(
            model_id=self.model_id, model_data=self.model_data, num_gpus=gpus, quantize=self.quantize,
            max_input_tokens=self.max_input_tokens, max_total_tokens=self.max_total_tokens, endpoint_name=name,
            variant_name=VARIANT, metrics=self.metrics, metrics_namespace=self.metrics_namespace, extra=self.env,
            force=self.force_env,
        )  # fmt: skip
        size = self.model_size_b if self.model_size_b is not None else parameters_in_billions(self.model_id)
        timeout = self.health_check_timeout_s or health_check_timeout(size)
        if not 60 <= timeout <= HEALTH_CHECK_MAX_S:
            raise ValueError(f"health_check_timeout_s must be between 60 and {HEALTH_CHECK_MAX_S}, got {timeout}")
        if self.async_inference is not None and not self.async_inference.output_path:
            raise ValueError("async_inference needs an output_path (s3://bucket/prefix) for the answers")
        return DeploymentPlan(name, env, timeout, gpus)

    def _async_config(self, endpoint_name: str) -> Any:  # noqa: ANN401 (AsyncInferenceConfig)
        """The async config with a failure path next to the outputs (sagemaker would otherwise resolve, and
        create, its default bucket for it); the caller's object is left as it is."""
        if self.async_inference is None or self.async_inference.failure_path:
            return self.async_inference
        config = copy.copy(self.async_inference)
        bucket, _ = split_s3(config.output_path)
        config.failure_path = f"s3://{bucket}/async-endpoint-failures/{endpoint_name}"
        return config

    def deploy(
        self, aws: Aws | None = None, wait: bool = True, poll_s: float = 15.0
    ) -> LLMPredictor | AsyncLLMPredictor:
        """Create the model, endpoint config and endpoint; with `wait`, return once the endpoint is InService."""
        plan = self.plan()
        aws = aws or Aws()
        model = _image_model_class()(
            image_uri=self.image_uri, env=plan.env, role=self.role, model_data=self.model_data, name=plan.endpoint_name,
            sagemaker_session=aws.sagemaker_session(),
        )  # fmt: skip
        options: dict[str, Any] = {}
        if self.model_data is not None:  # SageMaker downloads it before the container starts
            options["model_data_download_timeout"] = plan.health_check_timeout_s
        model.deploy(
            initial_instance_count=self.instance_count, instance_type=self.instance_type,
            endpoint_name=plan.endpoint_name, container_startup_health_check_timeout=plan.health_check_timeout_s,
            async_inference_config=self._async_config(plan.endpoint_name), tags=self.tags, wait=False, **options,
        )  # fmt: skip
        if wait:
            wait_in_service(aws, plan.endpoint_name, poll_s)
        if self.async_inference is not None:
            return AsyncLLMPredictor(plan.endpoint_name, self.async_inference.output_path, aws)
        return LLMPredictor(plan.endpoint_name, aws)


def _image_model_class() -> type:
    """HuggingFaceModel for an image that brings its own server: sagemaker 2.x resolves (and creates) the session's
    default S3 bucket, calling STS and S3, before it finds that there is no inference code to upload. With no code,
    nothing is uploaded and no bucket is needed; CreateModel gets the same container definition."""
    from sagemaker.huggingface import HuggingFaceModel

    class ImageModel(HuggingFaceModel):
        def _upload_code(self, key_prefix: str, repack: bool = False) -> None:
            if self.entry_point is not None:  # never for LLMDeployment; kept for the general case
                super()._upload_code(key_prefix, repack)
            else:
                self.uploaded_code = None

    return ImageModel


def deploy(
    model_id: str | None = None, *, aws: Aws | None = None, wait: bool = True, poll_s: float = 15.0, **fields: Any
) -> LLMPredictor | AsyncLLMPredictor:
    """`deploy("org/model", instance_type="ml.g5.2xlarge", image_uri=..., role=...)`: LLMDeployment's fields as
    keywords; returns the predictor (an AsyncLLMPredictor for async inference)."""
    return LLMDeployment(model_id=model_id, **fields).deploy(aws, wait, poll_s)


def wait_in_service(aws: Aws, endpoint_name: str, poll_s: float = 15.0, limit_s: float = WAIT_LIMIT_S) -> None:
    sm = aws.client("sagemaker")
    deadline = time.monotonic() + limit_s
    while True:
        endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
        status = endpoint["EndpointStatus"]
        if status == "InService":
            return
        if status in ("Failed", "OutOfService", "Deleting"):
            raise DeployError(f"endpoint {endpoint_name} is {status}: {endpoint.get('FailureReason', 'no reason')}")
        if time.monotonic() > deadline:
            raise DeployError(f"endpoint {endpoint_name} still {status} after {limit_s:.0f}s")
        time.sleep(poll_s)
