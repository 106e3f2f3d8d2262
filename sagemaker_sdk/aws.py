"""One place that makes the boto3 clients (and the sagemaker.Session) the SDK uses, from one boto3 session. Other
AWS endpoints (moto, a VPC endpoint) come from botocore's own configuration (AWS_ENDPOINT_URL, `endpoint_url` in
~/.aws/config), which the sagemaker SDK's internal clients honour too; only the runtime API can be pointed
elsewhere here (the local runtime emulator). Also what an endpoint is made of, read back from SageMaker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config

# SageMaker answers InvokeEndpoint within 60 s, and a stream may pause up to 60 s between parts; a retry of a
# generation would run it twice.
RUNTIME_CONFIG = Config(read_timeout=70, connect_timeout=10, retries={"mode": "standard", "max_attempts": 1})


@dataclass
class Aws:
    session: boto3.Session = field(default_factory=boto3.Session)
    runtime_endpoint_url: str | None = None  # sagemaker-runtime only
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        region: str | None = None,
        profile: str | None = None,
        runtime_endpoint_url: str | None = None,
    ) -> Aws:
        return cls(boto3.Session(region_name=region, profile_name=profile), runtime_endpoint_url)

    @property
    def region(self) -> str:
        region = self.session.region_name
        if not region:
            raise ValueError("no AWS region: pass region= (--region) or configure one (AWS_DEFAULT_REGION)")
        return region

    def client(self, service: str) -> Any:  # noqa: ANN401 (boto3's client classes are generated)
        if service not in self._clients:
            url, config = None, None
            if service == "sagemaker-runtime":
                url, config = self.runtime_endpoint_url, RUNTIME_CONFIG
            self._clients[service] = self.session.client(
                service, region_name=self.region, endpoint_url=url, config=config
            )
        return self._clients[service]

    def sagemaker_session(self) -> Any:  # noqa: ANN401 (sagemaker.Session, imported late: a slow import)
        """A sagemaker.Session on these clients, with the user's sagemaker config (defaults files) and the SDK's
        telemetry turned off (TelemetryOptOut)."""
        import sagemaker
        from sagemaker.config import load_sagemaker_config

        config = load_sagemaker_config()
        config.setdefault("SchemaVersion", "1.0")
        modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
        modules["TelemetryOptOut"] = True
        return sagemaker.Session(
            boto_session=self.session,
            sagemaker_client=self.client("sagemaker"),
            sagemaker_runtime_client=self.client("sagemaker-runtime"),
            sagemaker_config=config,
        )


@dataclass(frozen=True)
class EndpointParts:
    endpoint_name: str
    config_name: str
    variant_name: str
    model_name: str
    instance_type: str | None  # None for serverless variants
    status: str


def describe(aws: Aws, endpoint_name: str) -> EndpointParts:
    """The endpoint, its config and its (first) production variant."""
    sm = aws.client("sagemaker")
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    return EndpointParts(
        endpoint_name=endpoint_name,
        config_name=endpoint["EndpointConfigName"],
        variant_name=variant["VariantName"],
        model_name=variant["ModelName"],
        instance_type=variant.get("InstanceType"),
        status=endpoint["EndpointStatus"],
    )
