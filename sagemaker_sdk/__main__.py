"""`python -m sagemaker_sdk deploy|invoke|stream|delete|dashboard ...`: the SDK from a shell. AWS credentials,
region and endpoints come from boto3's usual configuration (AWS_PROFILE, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL...)
or --profile / --region; --runtime-endpoint-url sends invocations elsewhere (the local runtime emulator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sagemaker_sdk.autoscaling import ScalingConfig
from sagemaker_sdk.aws import Aws
from sagemaker_sdk.deploy import DeployError, LLMDeployment
from sagemaker_sdk.errors import EndpointError
from sagemaker_sdk.monitoring import monitor
from sagemaker_sdk.predictor import LLMPredictor, delete_endpoint


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _param(text: str) -> tuple[str, Any]:
    key, value = _pair(text)
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except ValueError:
        return key, value


def _aws(args: argparse.Namespace) -> Aws:
    return Aws.create(region=args.region, profile=args.profile, runtime_endpoint_url=args.runtime_endpoint_url)


def _print_json(value: Any) -> None:  # noqa: ANN401
    print(json.dumps(value, indent=2, default=str))


def cmd_deploy(args: argparse.Namespace) -> None:
    async_config = None
    if args.async_output_path:
        from sagemaker.async_inference import AsyncInferenceConfig

        async_config = AsyncInferenceConfig(
            output_path=args.async_output_path, max_concurrent_invocations_per_instance=args.async_max_concurrency
        )
    spec = LLMDeployment(
        instance_type=args.instance_type, image_uri=args.image_uri, role=args.role, model_id=args.model_id,
        model_data=args.model_data, endpoint_name=args.endpoint_name, num_gpus=args.num_gpus, quantize=args.quantize,
        max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens, env=dict(args.env),
        force_env=args.force_env, instance_count=args.instance_count, model_size_b=args.model_size_b,
        health_check_timeout_s=args.health_check_timeout, async_inference=async_config, metrics=not args.no_metrics,
        metrics_namespace=args.metrics_namespace,
    )  # fmt: skip
    plan = spec.plan()
    if args.dry_run:
        _print_json(dataclasses.asdict(plan))
        return
    aws = _aws(args)
    spec.deploy(aws, wait=not args.no_wait, poll_s=args.poll)
    result: dict[str, Any] = {"endpoint_name": plan.endpoint_name, "env": plan.env}
    if args.monitor:
        result["monitoring"] = dataclasses.asdict(monitor(plan.endpoint_name, aws))
    _print_json(result)


def _body_params(args: argparse.Namespace) -> dict[str, Any]:
    params = dict(args.param)
    if args.max_new_tokens is not None:
        params["max_tokens" if args.chat else "max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    return params


def cmd_invoke(args: argparse.Namespace) -> None:
    predictor = LLMPredictor(args.endpoint_name, _aws(args))
    if args.chat:
        print(predictor.chat([{"role": "user", "content": args.prompt}], **_body_params(args)))
    else:
        print(predictor.generate(args.prompt, **_body_params(args)))


def cmd_stream(args: argparse.Namespace) -> None:
    predictor = LLMPredictor(args.endpoint_name, _aws(args))
    if args.chat:
        pieces = predictor.chat([{"role": "user", "content": args.prompt}], stream=True, **_body_params(args))
    else:
        pieces = predictor.stream(args.prompt, **_body_params(args))
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def cmd_delete(args: argparse.Namespace) -> None:
    delete_endpoint(_aws(args), args.endpoint_name, monitoring=not args.keep_monitoring)
    print(f"deleted {args.endpoint_name}")


def cmd_dashboard(args: argparse.Namespace) -> None:
    scaling = None
    if not args.no_autoscaling:
        scaling = ScalingConfig(args.min_instances, args.max_instances, args.scaling_metric, args.target)
    result = monitor(
        args.endpoint_name, _aws(args), alarms=not args.no_alarms, autoscaling=scaling, alarm_actions=args.alarm_topic
    )
    _print_json(dataclasses.asdict(result))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    aws = common.add_argument_group("AWS")
    aws.add_argument("--region", help="AWS region (default: boto3's configuration)")
    aws.add_argument("--profile", help="AWS profile (default: boto3's configuration)")
    aws.add_argument("--runtime-endpoint-url", help="send invocations here (e.g. the local runtime emulator)")
    parser = argparse.ArgumentParser(prog="python -m sagemaker_sdk", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], None], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(run=run)
        return p

    d = command("deploy", cmd_deploy, "Deploy the container to a SageMaker endpoint (HuggingFaceModel.deploy).")
    d.add_argument("model_id", nargs="?", help="hub id; omit with --model-data, or for the embedded default model")
    d.add_argument("--instance-type", required=True, help="e.g. ml.g5.2xlarge")
    d.add_argument("--image-uri", required=True, help="the container image in ECR")
    d.add_argument("--role", required=True, help="SageMaker execution role ARN")
    d.add_argument("--model-data", help="s3:// model.tar.gz or prefix, served from /opt/ml/model")
    d.add_argument("--endpoint-name", help="default: llm-<model>-<time>")
    d.add_argument("--num-gpus", type=int, help="GPUs to shard over (default: the instance type's)")
    d.add_argument("--quantize", help="HF_MODEL_QUANTIZE")
    d.add_argument("--max-input-tokens", type=int)
    d.add_argument("--max-total-tokens", type=int)
    d.add_argument("--env", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="more variables")
    d.add_argument("--force-env", action="store_true", help="allow variables the container does not know")
    d.add_argument("--instance-count", type=int, default=1)
    d.add_argument("--model-size-b", type=float, help="billions of parameters (sets the health-check timeout)")
    d.add_argument("--health-check-timeout", type=int, help="seconds (default: from the model's size)")
    d.add_argument("--async-output-path", help="s3:// path: deploy for async inference (no 60 s limit)")
    d.add_argument("--async-max-concurrency", type=int, help="async invocations per instance")
    d.add_argument("--no-metrics", action="store_true", help="no CloudWatch EMF metrics from the container")
    d.add_argument("--metrics-namespace", help="CloudWatch namespace of the container's metrics")
    d.add_argument("--no-wait", action="store_true", help="return before the endpoint is InService")
    d.add_argument("--poll", type=float, default=15.0, help="seconds between status checks while waiting")
    d.add_argument("--monitor", action="store_true", help="then create the dashboard, alarms and autoscaling")
    d.add_argument("--dry-run", action="store_true", help="print the endpoint name and environment, create nothing")

    for name, run, text in (("invoke", cmd_invoke, "Generate text (InvokeEndpoint)."),
                            ("stream", cmd_stream, "Stream text (InvokeEndpointWithResponseStream).")):  # fmt: skip
        p = command(name, run, text)
        p.add_argument("endpoint_name")
        p.add_argument("prompt")
        p.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=JSON", help="more parameters")

    x = command("delete", cmd_delete, "Delete an endpoint, its config, its model and its monitoring.")
    x.add_argument("endpoint_name")
    x.add_argument("--keep-monitoring", action="store_true", help="keep the dashboard, alarms and autoscaling")

    m = command("dashboard", cmd_dashboard, "Create the CloudWatch dashboard, alarms and autoscaling of an endpoint.")
    m.add_argument("endpoint_name")
    m.add_argument("--no-alarms", action="store_true")
    m.add_argument("--alarm-topic", action="append", default=[], metavar="SNS_ARN", help="notify this topic")
    m.add_argument("--no-autoscaling", action="store_true")
    m.add_argument("--min-instances", type=int, default=1)
    m.add_argument("--max-instances", type=int, default=2)
    m.add_argument("--scaling-metric", choices=("concurrency", "invocations"), default="concurrency")
    m.add_argument("--target", type=float, default=16.0, help="in-flight requests (or invocations/min) per instance")
    return parser


def _quiet_sagemaker_config_log() -> None:
    """sagemaker logs its config lookups at INFO to stdout (where this CLI prints JSON): warnings only, to stderr."""
    config_logger = logging.getLogger("sagemaker.config")
    if not config_logger.handlers:
        config_logger.addHandler(logging.StreamHandler(sys.stderr))
        config_logger.setLevel(logging.WARNING)
        config_logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_sagemaker_config_log()
    try:
        args.run(args)
    except (EndpointError, ClientError, BotoCoreError, DeployError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad argument: environment, instance type, names
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
