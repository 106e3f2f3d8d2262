"""The image for real (marked `docker`; skipped unless a daemon answers `docker info`): build the CPU variant, then
the runner's docker mode runs it as SageMaker does. /ping and /invocations pass in the container with a model
mounted at /opt/ml/model (answer equal to engine.LLM's), with the embedded default model, and with HF_MODEL_ID;
`docker stop` (SIGTERM) lets `serve` drain and exit 0; the container is gone afterwards.

Containers use `--network host` (on these machines dockerd runs with --bridge=none --iptables=false). Settings:
DOCKER (the client; it must build with BuildKit) and DOCKER_TEST_BUILD_ARGS ("NAME=VALUE ..." added to the build,
e.g. a local CPU_BASE_IMAGE and TORCH_INDEX_URL where the public ones cannot be reached).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import LLM
from tests.local_mode._runner import SMALL, TGI_PAYLOAD, env_args, reference_llm, run_runner, tgi_reference
from tests.support.serve_process import ROOT, base_env, free_port
from tests.support.served_app import build_model

DOCKER = os.environ.get("DOCKER", "docker")
TAG = "sagemaker-llm-server:cpu-test"
BUILD_TIMEOUT = 1800


def _daemon_answers() -> bool:
    if shutil.which(DOCKER) is None:
        return False
    try:
        return subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not _daemon_answers(), reason="no Docker daemon answers `docker info`"),
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    build_args = [arg for pair in os.environ.get("DOCKER_TEST_BUILD_ARGS", "").split() for arg in ("--build-arg", pair)]
    log = tmp_path_factory.mktemp("docker_build") / "build.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [DOCKER, "build", "--network", "host", "--build-arg", "VARIANT=cpu", *build_args, "-t", TAG, str(ROOT)],
            env={**os.environ, "DOCKER_BUILDKIT": "1"}, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT,
        )  # fmt: skip
    assert done.returncode == 0, f"docker build failed:\n{log.read_text()[-6000:]}"
    yield TAG
    subprocess.run([DOCKER, "rmi", "-f", TAG], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("docker_model"))


def _run(image: str, *args: str) -> tuple:
    port = free_port()
    name = f"llm-test-{port}"
    r = run_runner(
        ["docker", image, "--network-host", "--port", str(port), "--gpus", "none", "--docker", DOCKER, "--name", name,
         "-e", "OMP_NUM_THREADS=1", *args],
        base_env(), timeout=600,
    )  # fmt: skip
    left = subprocess.run([DOCKER, "ps", "-aq", "--filter", f"name={name}"], capture_output=True, text=True)
    return r, left.stdout.strip()


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return reference_llm(model_dir)


def test_model_mounted_at_opt_ml_model(image: str, model_dir: Path, llm: LLM) -> None:
    r, left = _run(image, "--model", str(model_dir), "--payload", TGI_PAYLOAD, *env_args(SMALL))
    assert r.returncode == 0, r.explain()
    assert "-v" in r.stdout and f"{model_dir}:/opt/ml/model:ro" in r.stdout
    assert "GET /ping: 200 after" in r.stdout and "POST /invocations: 200 in" in r.stdout
    assert r.answer == tgi_reference(llm)
    assert r.stdout.rstrip().endswith("stopped: serve exited with code 0"), r.explain()  # SIGTERM reached serve
    assert "received SIGTERM" in r.stderr and "drained" in r.stderr
    assert left == ""  # --rm: nothing left behind


def test_embedded_default_model_answers_the_sample_chat(image: str) -> None:
    r, left = _run(image)
    assert r.returncode == 0, r.explain()
    body = r.body
    assert isinstance(body, dict) and body["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert "Paris" in r.answer  # the real model knows this one (greedy)
    assert r.stdout.rstrip().endswith("stopped: serve exited with code 0") and left == ""


def test_hf_model_id_local_path_is_mounted(image: str, model_dir: Path, llm: LLM) -> None:
    r, left = _run(image, "--hf-model-id", str(model_dir), "--payload", TGI_PAYLOAD, *env_args(SMALL))
    assert r.returncode == 0, r.explain()
    assert "HF_MODEL_ID=/opt/hf_model" in r.stdout
    assert r.answer == tgi_reference(llm)
    assert left == ""
