"""The container's environment for a deployment: built from a few arguments plus extra variables, then checked
before anything is created: strings only, SageMaker's limits (100 variables, 1024 bytes a value), names the
container knows (container/settings.py's registry) with values its own parsers accept, unless forced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from container.variables import VARIABLES, Variable

MAX_VARIABLES = 100  # SageMaker CreateModel: entries in Environment
MAX_VALUE_BYTES = 1024  # and bytes in one value (keys: 1024 characters)
# HuggingFaceModel.prepare_container_def adds these (script-mode variables the container ignores); they count.
ADDED_BY_SAGEMAKER_SDK = ("SAGEMAKER_PROGRAM", "SAGEMAKER_SUBMIT_DIRECTORY", "SAGEMAKER_CONTAINER_LOG_LEVEL",
                          "SAGEMAKER_REGION")  # fmt: skip
# Read inside the container by libraries rather than by container/settings.py.
LIBRARY_PREFIXES = ("HF_HUB_", "NCCL_", "PYTORCH_", "TORCH_", "CUDA_")
LIBRARY_NAMES = frozenset({"HF_HOME", "OMP_NUM_THREADS"})
MODEL_DIR = "/opt/ml/model"  # where SageMaker unpacks model_data
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,1023}$")  # SageMaker's pattern for an Environment key
_BY_NAME: dict[str, Variable] = {name: var for var in VARIABLES for name in var.names}


class EnvironmentValidationError(ValueError):
    """Everything wrong with an environment, in one message (one problem per line)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid container environment:\n  " + "\n  ".join(problems))
        self.problems = problems


def validate_environment(env: Mapping[str, object], force: bool = False) -> dict[str, str]:
    """`env` as a plain dict once it passes every check; `force` lets through names (and values) the container
    does not know, never SageMaker's own limits."""
    problems: list[str] = []
    seen: dict[Variable, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"{name!r}: a variable name is letters, digits and '_', not starting with a digit")
            continue
        if not isinstance(value, str):
            problems.append(f"{name}: values must be strings, got {type(value).__name__} {value!r}")
            continue
        if len(value.encode()) > MAX_VALUE_BYTES:
            problems.append(f"{name}: {len(value.encode())} bytes, SageMaker allows {MAX_VALUE_BYTES} per value")
        var = _BY_NAME.get(name)
        if var is None:
            if not force and name not in LIBRARY_NAMES and not name.startswith(LIBRARY_PREFIXES):
                problems.append(f"{name}: not a variable the container reads (force=True passes it anyway)")
            continue
        if var in seen:
            problems.append(f"{name} and {seen[var]} set the same variable: keep one")
        seen[var] = name
        if not force and value.strip():
            try:
                var.parse(value.strip())
            except ValueError:
                problems.append(f"{name}: must be {var.accepts}, got {value!r}")
    total = len(set(env) | set(ADDED_BY_SAGEMAKER_SDK))
    if total > MAX_VARIABLES:
        problems.append(f"{total} variables (with the SageMaker SDK's {len(ADDED_BY_SAGEMAKER_SDK)}), "
                        f"SageMaker allows {MAX_VARIABLES}")  # fmt: skip
    if problems:
        raise EnvironmentValidationError(problems)
    return {str(k): str(v) for k, v in env.items()}


def container_environment(
    *,
    model_id: str | None = None,
    model_data: str | None = None,
    num_gpus: int = 1,
    quantize: str | None = None,
    max_input_tokens: int | None = None,
    max_total_tokens: int | None = None,
    endpoint_name: str | None = None,
    variant_name: str = "AllTraffic",
    metrics: bool = True,
    metrics_namespace: str | None = None,
    extra: Mapping[str, object] | None = None,
    force: bool = False,
) -> dict[str, str]:
    """The environment of one deployment. `model_data` (S3) is served from /opt/ml/model; neither model gives the
    container's embedded default model. The endpoint's name goes in for the EMF metrics' dimensions."""
    if model_id is not None and model_data is not None:
        raise EnvironmentValidationError(["give model_id or model_data, not both"])
    env: dict[str, object] = {}
    if model_id is not None or model_data is not None:
        env["HF_MODEL_ID"] = model_id if model_id is not None else MODEL_DIR
    if num_gpus > 0:  # none on CPU instances: the container's default is one shard
        env["SM_NUM_GPUS"] = str(num_gpus)
    for name, value in (("HF_MODEL_QUANTIZE", quantize), ("MAX_INPUT_TOKENS", max_input_tokens),
                        ("MAX_TOTAL_TOKENS", max_total_tokens)):  # fmt: skip
        if value is not None:
            env[name] = str(value)
    if metrics:
        if endpoint_name:
            env["CLOUDWATCH_ENDPOINT_NAME"] = endpoint_name
        env["CLOUDWATCH_VARIANT_NAME"] = variant_name
        if metrics_namespace:
            env["CLOUDWATCH_NAMESPACE"] = metrics_namespace
    else:
        env["CLOUDWATCH_METRICS"] = "false"
    clashes = sorted(set(env) & set(extra or {}))
    if clashes:
        raise EnvironmentValidationError([f"{name} is set by an argument and again in the extra variables"
                                          for name in clashes])  # fmt: skip
    return validate_environment({**env, **(extra or {})}, force=force)
