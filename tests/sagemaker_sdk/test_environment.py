"""The deployment plan without AWS: GPUs per instance type, the container environment (built, validated against
SageMaker's limits and the container's own variable registry, and accepted by the container's own settings
loader), the health-check timeout and the endpoint name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from container.settings import load_settings
from container.variables import VARIABLES
from sagemaker_sdk import EnvironmentValidationError, InstanceTypeError, LLMDeployment, gpu_count
from sagemaker_sdk.deploy import endpoint_name_for, health_check_timeout, parameters_in_billions
from sagemaker_sdk.environment import ADDED_BY_SAGEMAKER_SDK, MAX_VARIABLES, container_environment, validate_environment
from sagemaker_sdk.instances import resolve_gpus
from tests.sagemaker_sdk.fakes import IMAGE, ROLE


@pytest.mark.parametrize(
    ("instance_type", "gpus"),
    [("ml.g4dn.xlarge", 1), ("ml.g4dn.12xlarge", 4), ("ml.g5.2xlarge", 1), ("ml.g5.12xlarge", 4),
     ("ml.g5.48xlarge", 8), ("ml.g6.24xlarge", 4), ("ml.g6e.xlarge", 1), ("ml.p3.8xlarge", 4),
     ("ml.p4d.24xlarge", 8), ("ml.p4de.24xlarge", 8), ("ml.p5.48xlarge", 8), ("ml.m5.xlarge", 0),
     ("ml.c7i.4xlarge", 0), ("ml.x9.large", None)],
)  # fmt: skip
def test_gpu_count(instance_type: str, gpus: int | None) -> None:
    assert gpu_count(instance_type) == gpus


def test_gpu_count_refusals() -> None:
    with pytest.raises(InstanceTypeError, match="Neuron"):
        gpu_count("ml.inf2.xlarge")
    with pytest.raises(InstanceTypeError, match="must look like"):
        gpu_count("g5.2xlarge")
    with pytest.raises(InstanceTypeError, match="not known: pass num_gpus"):
        resolve_gpus("ml.x9.large", None)
    with pytest.raises(InstanceTypeError, match="between 0 and 1"):
        resolve_gpus("ml.g5.2xlarge", 2)
    assert resolve_gpus("ml.x9.large", 2) == 2 and resolve_gpus("ml.g5.12xlarge", 1) == 1


def test_environment_from_arguments() -> None:
    env = container_environment(
        model_id="org/model-7B", num_gpus=4, max_input_tokens=1000, max_total_tokens=2000, endpoint_name="ep",
        extra={"MAX_BATCH_PREFILL_TOKENS": "4096", "HF_HUB_ENABLE_HF_TRANSFER": "1"},
    )  # fmt: skip
    assert env == {
        "HF_MODEL_ID": "org/model-7B", "SM_NUM_GPUS": "4", "MAX_INPUT_TOKENS": "1000", "MAX_TOTAL_TOKENS": "2000",
        "CLOUDWATCH_ENDPOINT_NAME": "ep", "CLOUDWATCH_VARIANT_NAME": "AllTraffic", "MAX_BATCH_PREFILL_TOKENS": "4096",
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
    }  # fmt: skip
    s3 = container_environment(model_data="s3://b/model.tar.gz", num_gpus=0, metrics=False)
    assert s3 == {"HF_MODEL_ID": "/opt/ml/model", "CLOUDWATCH_METRICS": "false"}  # CPU: no SM_NUM_GPUS
    assert container_environment(metrics_namespace="Mine", num_gpus=1)["CLOUDWATCH_NAMESPACE"] == "Mine"


def test_the_container_accepts_what_the_sdk_builds(tmp_path: Path) -> None:
    plan = LLMDeployment("ml.g5.2xlarge", IMAGE, ROLE, model_id="org/model", max_total_tokens=2048,
                         metrics_namespace="Team/LLM", env={"DTYPE": "float16"}).plan()  # fmt: skip
    settings = load_settings({**plan.env, "SM_OPT_ML_DIR": str(tmp_path)})
    assert settings.engine.model == "org/model" and settings.engine.dtype == "float16"
    assert settings.cloudwatch.endpoint_name == plan.endpoint_name and settings.cloudwatch.namespace == "Team/LLM"
    assert settings.limits.max_total_tokens == 2048


def _problems(env: dict, force: bool = False) -> list[str]:
    with pytest.raises(EnvironmentValidationError) as info:
        validate_environment(env, force=force)
    return info.value.problems


def test_validation_reports_every_problem_at_once() -> None:
    problems = _problems({
        "MAX_TOTAL_TOKENS": 2048, "MAX_INPUT_TOKENS": "abc", "NOT_A_SETTING": "1", "1BAD": "x",
        "HF_TOKEN": "x" * 1025, "MAX_INPUT_LENGTH": "10",
    })  # fmt: skip
    assert len(problems) == 6, problems
    assert "MAX_TOTAL_TOKENS: values must be strings, got int 2048" in problems
    assert "MAX_INPUT_TOKENS: must be a positive integer, got 'abc'" in problems
    assert any(p.startswith("NOT_A_SETTING: not a variable the container reads") for p in problems)
    assert any(p.startswith("'1BAD'") for p in problems)
    assert "HF_TOKEN: 1025 bytes, SageMaker allows 1024 per value" in problems
    assert "MAX_INPUT_LENGTH and MAX_INPUT_TOKENS set the same variable: keep one" in problems


def test_force_passes_unknown_names_but_never_sagemakers_limits() -> None:
    assert validate_environment({"NOT_A_SETTING": "1", "DTYPE": "float8"}, force=True)["DTYPE"] == "float8"
    assert _problems({"X": "é" * 513}, force=True) == ["X: 1026 bytes, SageMaker allows 1024 per value"]
    room = MAX_VARIABLES - len(ADDED_BY_SAGEMAKER_SDK)
    assert len(validate_environment({f"V{i}": "1" for i in range(room)}, force=True)) == room
    assert _problems({f"V{i}": "1" for i in range(room + 1)}, force=True) == [
        "101 variables (with the SageMaker SDK's 4), SageMaker allows 100"
    ]


def test_known_names_are_the_containers_registry() -> None:
    names = [name for var in VARIABLES for name in var.names]
    assert "CLOUDWATCH_ENDPOINT_NAME" in names and "SM_NUM_GPUS" in names
    validate_environment(dict.fromkeys((var.names[0] for var in VARIABLES), ""))  # every name known (empty: unset)


def test_arguments_and_extra_variables_must_not_clash() -> None:
    with pytest.raises(EnvironmentValidationError, match="MAX_TOTAL_TOKENS is set by an argument and again"):
        container_environment(max_total_tokens=10, extra={"MAX_TOTAL_TOKENS": "20"})
    with pytest.raises(EnvironmentValidationError, match="model_id or model_data, not both"):
        container_environment(model_id="a/b", model_data="s3://b/m.tar.gz")


def test_health_check_timeout_grows_with_the_model() -> None:
    assert parameters_in_billions("meta-llama/Llama-3.1-8B-Instruct") == 8
    assert parameters_in_billions("mistralai/Mixtral-8x7B-Instruct-v0.1") == 56
    assert parameters_in_billions("HuggingFaceTB/SmolLM2-135M-Instruct") == 0.135
    assert parameters_in_billions("Qwen/Qwen2.5-0.5B") == 0.5 and parameters_in_billions("gpt2") is None
    sizes = [0.1, 1, 8, 70, 405]
    timeouts = [health_check_timeout(s) for s in sizes]
    assert timeouts == sorted(timeouts) and timeouts[0] >= 300 and timeouts[-1] == 3600
    assert health_check_timeout(None) == 900
    plan = LLMDeployment("ml.g5.2xlarge", IMAGE, ROLE, model_id="org/Big-70B").plan()
    assert plan.health_check_timeout_s == health_check_timeout(70) > health_check_timeout(8)
    assert LLMDeployment("ml.g5.2xlarge", IMAGE, ROLE, model_size_b=8).plan().health_check_timeout_s == 460


def test_endpoint_names() -> None:
    name = endpoint_name_for("meta-llama/Llama-3.1-8B-Instruct_with.a-very-long-name-indeed-" + "x" * 40)
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name) and name.startswith("llm-llama-3-1-8b")
    with pytest.raises(ValueError, match="endpoint_name must be"):
        LLMDeployment("ml.g5.2xlarge", IMAGE, ROLE, endpoint_name="bad_name").plan()
