"""The image run the way SageMaker runs it: `docker run ... IMAGE serve` with the model at /opt/ml/model (read-only)
or HF_MODEL_ID, the GPUs, a large /dev/shm and port 8080; stopped with `docker stop` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from local_mode.server import STOP_TIMEOUT_S, LocalServer

CONTAINER_PORT = 8080  # what SageMaker maps; with host networking SAGEMAKER_BIND_TO_PORT moves it instead
OPT_ML_MODEL = "/opt/ml/model"
HF_MODEL_MOUNT = "/opt/hf_model"  # where a local HF_MODEL_ID path is mounted
HF_CACHE = "/var/cache/huggingface"  # the image's HF_HOME


@dataclass(frozen=True)
class DockerSpec:
    image: str
    port: int = CONTAINER_PORT
    model_dir: Path | None = None  # mounted read-only at /opt/ml/model
    hf_model_id: str | None = None  # a hub id, or a local path (mounted read-only)
    env: dict[str, str | None] = field(default_factory=dict)  # None: docker passes the runner's own value
    gpus: bool = False
    shm_size: str = "1g"
    host_network: bool = False
    hf_cache: Path | None = None  # a host directory kept across runs for hub downloads
    name: str | None = None

    @property
    def container_name(self) -> str:
        return self.name or f"sagemaker-llm-{self.port}"


def docker_run_command(spec: DockerSpec, docker: str = "docker") -> list[str]:
    """The exact `docker run` argv for `spec`."""
    cmd = [docker, "run", "--rm", "--name", spec.container_name]
    if spec.gpus:
        cmd += ["--gpus", "all"]
    cmd += ["--shm-size", spec.shm_size]
    env: dict[str, str | None] = {}
    if spec.host_network:
        cmd += ["--network", "host"]
        env["SAGEMAKER_BIND_TO_PORT"] = str(spec.port)
    else:
        cmd += ["-p", f"127.0.0.1:{spec.port}:{CONTAINER_PORT}"]
    if spec.model_dir is not None:
        cmd += ["-v", f"{spec.model_dir.resolve()}:{OPT_ML_MODEL}:ro"]
    if spec.hf_model_id is not None:
        local = Path(spec.hf_model_id).expanduser()
        if local.exists():
            target = f"{HF_MODEL_MOUNT}/{local.name}" if local.is_file() else HF_MODEL_MOUNT
            cmd += ["-v", f"{local.resolve()}:{target}:ro"]
            env["HF_MODEL_ID"] = target
        else:
            env["HF_MODEL_ID"] = spec.hf_model_id
    if spec.hf_cache is not None:
        cmd += ["-v", f"{spec.hf_cache.resolve()}:{HF_CACHE}"]
    env.update(spec.env)
    for name, value in env.items():
        cmd += ["-e", name if value is None else f"{name}={value}"]
    return cmd + [spec.image, "serve"]


def gpus_available(nvidia_smi: str = "nvidia-smi") -> bool:
    """Whether `nvidia-smi -L` lists a GPU on this host."""
    if shutil.which(nvidia_smi) is None:
        return False
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


class DockerServer(LocalServer):
    """`docker run` in the foreground: its exit code is the container's (`serve`'s)."""

    def __init__(self, spec: DockerSpec, docker: str = "docker", log: IO[Any] | None = None) -> None:
        super().__init__(spec.port, log)
        self.spec, self.docker = spec, docker

    def command(self) -> list[str]:
        return docker_run_command(self.spec, self.docker)

    def request_stop(self) -> None:
        grace = str(int(STOP_TIMEOUT_S) - 5)  # docker's SIGKILL comes first, before our own
        subprocess.run(
            [self.docker, "stop", "--time", grace, self.spec.container_name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=STOP_TIMEOUT_S,
        )  # fmt: skip

    def kill(self) -> None:
        subprocess.run(
            [self.docker, "kill", self.spec.container_name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=30,
        )  # fmt: skip
        super().kill()
