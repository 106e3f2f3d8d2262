"""`python -m sagemaker_sdk`: --help of every command; deploy / dashboard / delete against moto (AWS_ENDPOINT_URL);
invoke / stream against the real server through the runtime emulator (--runtime-endpoint-url); clear errors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest

from sagemaker_sdk.__main__ import main
from tests.sagemaker_sdk.fakes import ENDPOINT, IMAGE, REGION, ROLE
from tests.support.serve_process import ROOT, Serve

COMMANDS = ("deploy", "invoke", "stream", "delete", "dashboard")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: python -m sagemaker_sdk {command}")
    assert "--region" in out and "--runtime-endpoint-url" in out


@pytest.mark.slow
def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "sagemaker_sdk", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS), result.stderr


@pytest.mark.slow
def test_deploy_dashboard_delete(moto: str, capsys: pytest.CaptureFixture[str]) -> None:
    sm = boto3.client("sagemaker", region_name=REGION)
    args = ("deploy", "org/model-8B", "--instance-type", "ml.g4dn.xlarge", "--image-uri", IMAGE, "--role", ROLE,
            "--endpoint-name", "cli-llm", "--env", "DTYPE=float16")  # fmt: skip
    code, out, err = _run(capsys, *args, "--dry-run")
    plan = json.loads(out)
    assert code == 0 and plan["endpoint_name"] == "cli-llm" and plan["health_check_timeout_s"] == 460
    assert plan["env"]["DTYPE"] == "float16" and sm.list_models()["Models"] == []  # a dry run creates nothing

    code, out, err = _run(capsys, *args, "--poll", "0.01")
    assert code == 0, err
    assert json.loads(out)["env"] == plan["env"]
    model = sm.describe_model(ModelName="cli-llm")
    assert {k: v for k, v in model["PrimaryContainer"]["Environment"].items() if k in plan["env"]} == plan["env"]

    code, out, err = _run(capsys, "dashboard", "cli-llm", "--no-autoscaling", "--alarm-topic",
                          "arn:aws:sns:us-east-1:123456789012:ops")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["dashboard"] == "cli-llm" and len(result["alarms"]) == 3 and result["scaling_policy"] is None
    alarm = boto3.client("cloudwatch", region_name=REGION).describe_alarms(AlarmNames=result["alarms"][:1])
    assert alarm["MetricAlarms"][0]["AlarmActions"] == ["arn:aws:sns:us-east-1:123456789012:ops"]

    code, out, err = _run(capsys, "delete", "cli-llm")
    assert code == 0 and out == "deleted cli-llm\n", err
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert boto3.client("cloudwatch", region_name=REGION).list_dashboards()["DashboardEntries"] == []


def test_bad_arguments_exit_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "deploy", "--instance-type", "ml.g4dn.xlarge", "--image-uri", IMAGE, "--role", ROLE,
                        "--env", "MAX_TOTAL_TOKENS=lots", "--env", "NOPE=1", "--dry-run")  # fmt: skip
    assert code == 2 and err.startswith("error: invalid container environment:")
    assert "MAX_TOTAL_TOKENS: must be a positive integer, got 'lots'" in err and "NOPE: not a variable" in err
    code, _, err = _run(capsys, "deploy", "--instance-type", "ml.inf2.xlarge", "--image-uri", IMAGE, "--role", ROLE)
    assert code == 2 and "Neuron" in err


@pytest.mark.integration
def test_invoke_and_stream(runtime_url: str, server: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    status, raw = server.post("/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 10}})
    expected = json.loads(raw)[0]["generated_text"]
    common = ("--runtime-endpoint-url", runtime_url, "--max-new-tokens", "10")
    for command in ("invoke", "stream"):
        code, out, err = _run(capsys, command, ENDPOINT, "Hello", *common)
        assert (code, out) == (0, expected + "\n"), f"{command}: {err}"
    chat = _run(capsys, "invoke", ENDPOINT, "Hello", "--chat", "--param", "temperature=0", *common)
    streamed_chat = _run(capsys, "stream", ENDPOINT, "Hello", "--chat", "--param", "temperature=0", *common)
    assert chat[0] == 0 and chat[1] == streamed_chat[1] and chat[1].strip()
    code, out, err = _run(capsys, "invoke", ENDPOINT, "Hello", "--runtime-endpoint-url", runtime_url,
                          "--max-new-tokens", "0")  # fmt: skip
    assert code == 1 and out == "" and err.startswith("error: ModelError (422): ") and "max_new_tokens" in err
