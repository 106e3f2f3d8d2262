"""A thin SDK over sagemaker 2.x and boto3: deploy the container (`deploy`), talk to the endpoint
(`LLMPredictor`: generate / stream / chat / delete), and watch it in CloudWatch (`monitor`: dashboard, alarms,
autoscaling). `python -m sagemaker_sdk --help` is the same from a shell.
"""

from sagemaker_sdk.alarms import AlarmThresholds, create_alarms
from sagemaker_sdk.async_predictor import AsyncLLMPredictor, AsyncResult
from sagemaker_sdk.autoscaling import ScalingConfig, enable_autoscaling
from sagemaker_sdk.aws import Aws
from sagemaker_sdk.dashboard import create_dashboard, dashboard_body
from sagemaker_sdk.deploy import DeployError, LLMDeployment, deploy
from sagemaker_sdk.environment import EnvironmentValidationError, container_environment, validate_environment
from sagemaker_sdk.errors import EndpointError
from sagemaker_sdk.instances import InstanceTypeError, gpu_count
from sagemaker_sdk.monitoring import Monitoring, monitor, remove_monitoring
from sagemaker_sdk.predictor import LLMPredictor

__all__ = [
    "AlarmThresholds", "AsyncLLMPredictor", "AsyncResult", "Aws", "DeployError", "EndpointError",
    "EnvironmentValidationError", "InstanceTypeError", "LLMDeployment", "LLMPredictor", "Monitoring",
    "ScalingConfig", "container_environment", "create_alarms", "create_dashboard", "dashboard_body", "deploy",
    "enable_autoscaling", "gpu_count", "monitor", "remove_monitoring", "validate_environment",
]  # fmt: skip
