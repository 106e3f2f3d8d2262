"""The runner's docker mode without a daemon: the exact `docker run` argv SageMaker's contract needs (GPUs, shared
memory, port, the model read-only at /opt/ml/model, HF_MODEL_ID, env, `IMAGE serve`), the CLI that builds it, and
the compose file's service, which must run the image the same way.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from local_mode.docker_server import DockerSpec, docker_run_command, gpus_available
from local_mode.run import _masked, main
from tests.support.serve_process import ROOT

IMAGE = "sagemaker-llm-server:cpu"


def test_default_run_maps_port_8080_on_loopback_and_runs_serve() -> None:
    assert docker_run_command(DockerSpec(IMAGE)) == [
        "docker", "run", "--rm", "--name", "sagemaker-llm-8080", "--shm-size", "1g",
        "-p", "127.0.0.1:8080:8080", IMAGE, "serve",
    ]  # fmt: skip


def test_gpus_model_mount_env_and_shm(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    spec = DockerSpec(
        IMAGE, port=9001, model_dir=model, env={"HF_TOKEN": None, "MAX_TOTAL_TOKENS": "512"}, gpus=True,
        shm_size="8g", hf_cache=tmp_path / "cache", name="mine",
    )  # fmt: skip
    assert docker_run_command(spec, docker="/usr/bin/docker") == [
        "/usr/bin/docker", "run", "--rm", "--name", "mine", "--gpus", "all", "--shm-size", "8g",
        "-p", "127.0.0.1:9001:8080",
        "-v", f"{model.resolve()}:/opt/ml/model:ro",
        "-v", f"{(tmp_path / 'cache').resolve()}:/var/cache/huggingface",
        "-e", "HF_TOKEN",  # no value: docker passes the caller's own
        "-e", "MAX_TOTAL_TOKENS=512",
        IMAGE, "serve",
    ]  # fmt: skip


def test_host_network_binds_the_port_through_sagemaker_bind_to_port() -> None:
    cmd = docker_run_command(DockerSpec(IMAGE, port=9002, host_network=True))
    assert cmd == [
        "docker", "run", "--rm", "--name", "sagemaker-llm-9002", "--shm-size", "1g", "--network", "host",
        "-e", "SAGEMAKER_BIND_TO_PORT=9002", IMAGE, "serve",
    ]  # fmt: skip


def test_hf_model_id_hub_id_or_mounted_local_path(tmp_path: Path) -> None:
    hub = docker_run_command(DockerSpec(IMAGE, hf_model_id="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert hub[-4:] == ["-e", "HF_MODEL_ID=HuggingFaceTB/SmolLM2-135M-Instruct", IMAGE, "serve"]
    assert "-v" not in hub
    local = docker_run_command(DockerSpec(IMAGE, hf_model_id=str(tmp_path)))
    assert local[-6:] == ["-v", f"{tmp_path}:/opt/hf_model:ro", "-e", "HF_MODEL_ID=/opt/hf_model", IMAGE, "serve"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    one_file = docker_run_command(DockerSpec(IMAGE, hf_model_id=str(gguf)))
    assert one_file[-6:] == [
        "-v", f"{gguf}:/opt/hf_model/m.gguf:ro", "-e", "HF_MODEL_ID=/opt/hf_model/m.gguf", IMAGE, "serve",
    ]  # fmt: skip


def test_explicit_env_wins_over_what_the_runner_sets() -> None:
    cmd = docker_run_command(DockerSpec(IMAGE, port=9003, host_network=True, env={"SAGEMAKER_BIND_TO_PORT": "9004"}))
    assert cmd.count("-e") == 1 and "SAGEMAKER_BIND_TO_PORT=9004" in cmd


def _fake_nvidia_smi(tmp_path: Path, output: str, code: int = 0) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_gpu_detection_reads_nvidia_smi(tmp_path: Path) -> None:
    assert gpus_available(_fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"))
    assert not gpus_available(_fake_nvidia_smi(tmp_path, "No devices were found\n", code=6))
    assert not gpus_available(str(tmp_path / "absent"))


def test_cli_prints_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([
        "docker", IMAGE, "--model", str(tmp_path), "--port", "9005", "--gpus", "none", "-e", "LOG_LEVEL=debug",
        "--hf-model-id", "org/name", "--print-command",
    ])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.split() == [
        "docker", "run", "--rm", "--name", "sagemaker-llm-9005", "--shm-size", "1g", "-p", "127.0.0.1:9005:8080",
        "-v", f"{tmp_path.resolve()}:/opt/ml/model:ro", "-e", "HF_MODEL_ID=org/name", "-e", "LOG_LEVEL=debug",
        IMAGE, "serve",
    ]  # fmt: skip
    code = main(["docker", IMAGE, "--gpus", "all", "--print-command"])
    assert code == 0 and "--gpus all" in capsys.readouterr().out


def test_compose_service_runs_the_image_as_the_runner_does() -> None:
    compose = yaml.safe_load((ROOT / "local_mode" / "compose.yaml").read_text())
    spec = docker_run_command(DockerSpec(IMAGE))
    for variant in ("cpu", "gpu"):
        service = compose["services"][f"model-{variant}"]
        assert service["profiles"] == [variant] and service["image"] == f"sagemaker-llm-server:{variant}"
        assert service["build"]["args"] == {"VARIANT": variant}
        assert (ROOT / "local_mode" / service["build"]["context"]).resolve() == ROOT
        assert service["command"] == spec[-1:]
        assert service["shm_size"] == spec[spec.index("--shm-size") + 1]
        assert service["ports"] == ["127.0.0.1:${PORT:-8080}:8080"]
        assert service["volumes"][0] == "${MODEL_DIR:-empty-model}:/opt/ml/model:ro"
        assert set(service["environment"]) == {"HF_MODEL_ID", "HF_TOKEN"}
    gpu = compose["services"]["model-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]  # what --gpus all asks for
    assert "deploy" not in compose["services"]["model-cpu"]


def test_the_logged_command_hides_secrets() -> None:
    shown = _masked(["docker", "run", "-e", "HF_TOKEN=hf_secret", "-e", "API_KEY=k", "-e", "LOG_LEVEL=debug", IMAGE])
    assert "hf_secret" not in shown and "API_KEY=***" in shown and "LOG_LEVEL=debug" in shown
