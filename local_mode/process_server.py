"""`serve` as a local process against an /opt/ml-shaped directory, no Docker: what CI runs. The model is
$SM_OPT_ML_DIR/model (a directory given as is, or a model linked into a fresh one) or HF_MODEL_ID.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from container.settings import child_environment
from local_mode.server import LocalServer


@dataclass(frozen=True)
class ProcessSpec:
    opt_ml: Path  # /opt/ml-shaped: serve takes opt_ml/model when it holds a model
    port: int = 8080
    hf_model_id: str | None = None
    env: dict[str, str | None] = field(default_factory=dict)  # None: keep the runner's own value


def opt_ml_dir(model_dir: Path | None, workdir: Path | None = None) -> Path:
    """A fresh /opt/ml-shaped directory whose model/ is `model_dir` (a link) or empty."""
    root = Path(tempfile.mkdtemp(prefix="opt-ml-", dir=workdir))
    model = root / "model"
    if model_dir is None:
        model.mkdir()
    else:
        model.symlink_to(model_dir.resolve(), target_is_directory=True)
    return root


def serve_environment(spec: ProcessSpec) -> dict[str, str]:
    """The runner's environment plus what SageMaker would set, plus the spec's own variables."""
    extra = {"SM_OPT_ML_DIR": str(spec.opt_ml), "SAGEMAKER_BIND_TO_PORT": str(spec.port)}
    if spec.hf_model_id is not None:
        extra["HF_MODEL_ID"] = spec.hf_model_id
    extra.update({name: value for name, value in spec.env.items() if value is not None})
    return child_environment(extra)


class ProcessServer(LocalServer):
    """`serve` (this interpreter, `-m container.launcher serve`) on loopback; stopped with SIGTERM."""

    def __init__(self, spec: ProcessSpec, log: IO[Any] | None = None) -> None:
        super().__init__(spec.port, log)
        self.spec = spec

    def command(self) -> list[str]:
        return [sys.executable, "-m", "container.launcher", "serve"]

    def environment(self) -> dict[str, str]:
        return serve_environment(self.spec)

    def request_stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
