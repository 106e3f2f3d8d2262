"""`python -m local_mode.run process` end to end, no Docker: the runner starts the real `serve` against an
/opt/ml-shaped temp directory (or HF_MODEL_ID), waits for /ping, sends the sample /invocations, reports the answer
(equal to engine.LLM's greedy answer in-process) and stops `serve` with SIGTERM (exit 0, port closed, nothing left).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from engine import LLM
from local_mode.server import ping
from tests.local_mode._runner import (
    SMALL,
    TGI_PAYLOAD,
    chat_reference,
    env_args,
    reference_llm,
    run_runner,
    tgi_reference,
)
from tests.support.serve_process import ROOT, base_env, free_port
from tests.support.served_app import build_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("runner_model"))  # llama_gqa with a chat template


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return reference_llm(model_dir)


def _closed(port: int) -> bool:
    return ping(f"http://127.0.0.1:{port}") is None


def test_opt_ml_directory_end_to_end(model_dir: Path, llm: LLM, tmp_path: Path) -> None:
    opt_ml = tmp_path / "opt_ml"
    shutil.copytree(model_dir, opt_ml / "model")  # SageMaker unpacks model.tar.gz here
    port = free_port()
    r = run_runner(
        ["process", "--opt-ml", str(opt_ml), "--port", str(port), "--payload", TGI_PAYLOAD, *env_args(SMALL)],
        base_env(),
    )
    assert r.returncode == 0, r.explain()
    assert f"/opt/ml: {opt_ml}" in r.stdout and "GET /ping: 200 after" in r.stdout
    assert "POST /invocations: 200 in" in r.stdout
    assert r.body == [{"generated_text": tgi_reference(llm)}]
    assert r.answer == tgi_reference(llm)
    assert r.stdout.rstrip().endswith("stopped: serve exited with code 0"), r.explain()
    assert "drained" in r.stderr  # serve's own log (the runner's stderr): it drained on SIGTERM
    assert _closed(port)
    assert (opt_ml / "model" / "config.json").is_file()  # a directory given is left as it was


def test_hf_model_id_local_path_and_the_default_chat_payload(model_dir: Path, llm: LLM) -> None:
    port = free_port()
    r = run_runner(["process", "--hf-model-id", str(model_dir), "--port", str(port), *env_args(SMALL)], base_env())
    assert r.returncode == 0, r.explain()
    body = r.body
    assert isinstance(body, dict) and body["object"] == "chat.completion"
    assert body["model"] == str(model_dir)
    assert r.answer == body["choices"][0]["message"]["content"] == chat_reference(llm)
    assert r.stdout.rstrip().endswith("stopped: serve exited with code 0")
    assert _closed(port)


def test_model_linked_into_a_fresh_opt_ml(model_dir: Path, llm: LLM) -> None:
    port = free_port()
    r = run_runner(
        ["process", "--model", str(model_dir), "--port", str(port), "--payload", TGI_PAYLOAD, *env_args(SMALL)],
        base_env(),
    )
    assert r.returncode == 0, r.explain()
    assert r.answer == tgi_reference(llm)
    opt_ml = Path(r.stdout.split("/opt/ml: ", 1)[1].split("\n", 1)[0])
    assert not opt_ml.exists()  # the runner's own temp directory is removed; the model is not
    assert (model_dir / "config.json").is_file()


def test_a_server_that_fails_to_start_is_reported(model_dir: Path) -> None:
    r = run_runner(["process", "--model", str(model_dir), "--port", str(free_port()), "-e", "DTYPE=float64"],
                   base_env(), timeout=120)  # fmt: skip
    assert r.returncode == 1
    assert "error: the server exited with code 2 before /ping answered 200" in r.stderr
    assert "DTYPE must be" in r.stderr  # serve's one-line settings error
    assert "stopped: serve exited with code 2" in r.stdout


def test_bad_arguments_exit_2(model_dir: Path, tmp_path: Path) -> None:
    r = run_runner(["process", "--payload", "{not json"], base_env(), timeout=60)
    assert r.returncode == 2 and "the payload is not JSON" in r.stderr
    r = run_runner(["process", "--model", str(tmp_path / "missing")], base_env(), timeout=60)
    assert r.returncode == 2 and "is not a directory" in r.stderr
    r = run_runner(["process", "--model", str(model_dir), "--opt-ml", str(tmp_path)], base_env(), timeout=60)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_keep_running_behind_the_runtime_emulator_until_sigterm(model_dir: Path, llm: LLM, tmp_path: Path) -> None:
    """--keep-running --emulator-port: boto3 reaches the model as an endpoint; SIGTERM to the runner stops serve."""
    port, emulator_port = free_port(), free_port()
    command = [sys.executable, "-m", "local_mode.run", "process", "--model", str(model_dir), "--port", str(port),
               "--payload", TGI_PAYLOAD, "--keep-running", "--emulator-port", str(emulator_port),
               "--endpoint-name", "local-tiny", "--ready-timeout", "120", "--log", str(tmp_path / "serve.log"),
               *env_args(SMALL)]  # fmt: skip
    runner = subprocess.Popen(command, env=base_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving on")):
            line = runner.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        runtime = boto3.client(
            "sagemaker-runtime", endpoint_url=f"http://127.0.0.1:{emulator_port}", region_name="us-east-1",
            aws_access_key_id="x", aws_secret_access_key="x",
        )  # fmt: skip
        answer = runtime.invoke_endpoint(EndpointName="local-tiny", Body=TGI_PAYLOAD, ContentType="application/json")
        assert json.loads(answer["Body"].read()) == [{"generated_text": tgi_reference(llm)}]
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, "".join(lines) + out
    assert out.rstrip().endswith("stopped: serve exited with code 0")
    assert _closed(port) and _closed(emulator_port)
