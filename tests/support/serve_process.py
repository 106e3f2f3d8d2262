"""Helpers for the process tests: a tiny checkpoint whose greedy output never ends (long streams on demand),
and `serve` started as a real subprocess on a free port, with its process tree inspected through psutil.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from tests.support.tiny_models import craft_byte_chain
from tests.support.tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 2048
LIVE_ENDPOINT = "tiny-llm"  # the SageMaker endpoint name conftest's `live_runtime` serves `live_server` under


def write_chain_model(path: Path, context: int = CONTEXT) -> Path:
    """A one-layer llama whose greedy decoding cycles over the bytes of CHAIN_TEXT forever (no EOS)."""
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, rms_norm_eps=1e-6,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        craft_byte_chain(model, tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment minus anything `serve` reads, plus `extra`; one torch thread (2 shared cores)."""
    from container.variables import VARIABLES

    ours = {name for var in VARIABLES for name in var.names}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    return env


def run_serve(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "container.launcher"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


class Serve:
    """`serve` as a subprocess; its output goes to a log file (read it with `log()`)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["SAGEMAKER_BIND_TO_PORT"])
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "container.launcher", "ignored", "args"],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, path: str = "/ping", timeout: float = 5) -> int | None:
        """HTTP status of a GET, None when nothing listens."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def post(self, path: str, body: dict, timeout: float = 30) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            if self.status(timeout=2) == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"serve not ready after {timeout}s:\n{self.log()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engine_process(self) -> psutil.Process:
        """The engine: the launcher's multiprocessing (spawn) child."""
        found = [p for p in self.ps.children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(found) == 1, [p.cmdline() for p in self.ps.children()]
        return found[0]

    def gunicorn_master(self) -> psutil.Process:
        found = [p for p in self.ps.children() if "gunicorn" in " ".join(p.cmdline())]
        assert len(found) == 1, [p.cmdline() for p in self.ps.children()]
        return found[0]

    def runtime_dir(self) -> Path:
        """The launcher's private runtime dir, read off gunicorn's command line (its worker config lives there)."""
        app = self.gunicorn_master().cmdline()[-1]  # serve.wsgi:build_app('<runtime dir>/worker.pkl')
        return Path(app.split("'")[1]).parent

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running after {timeout}s:\n{self.log()}") from None

    def close(self) -> None:
        """Kill whatever is left (only after a failed test)."""
        leftovers = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


def wait_gone(processes: list[psutil.Process], timeout: float = 10) -> list[psutil.Process]:
    """Processes still alive after `timeout` (zombies count as gone)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@contextmanager
def running_serve(model_dir: Path, workdir: Path, **extra: str) -> Iterator[Serve]:
    """A real `serve` on a free port over `model_dir` (float32, one worker, small limits; `extra` variables
    override), ready to use; on the way out it must drain on SIGTERM, exit 0 and leave no process behind."""
    defaults = dict(
        HF_MODEL_ID=str(model_dir),
        SM_OPT_ML_DIR=str(workdir / "opt_ml"),
        SAGEMAKER_BIND_TO_PORT=str(free_port()),
        DTYPE="float32",
        MAX_TOTAL_TOKENS="256",
        MAX_BATCH_TOTAL_TOKENS="4096",
        MAX_CONCURRENT_REQUESTS="8",
        SERVE_WORKERS="1",
    )
    env = base_env(**{**defaults, **extra})
    (workdir / "opt_ml").mkdir(parents=True, exist_ok=True)
    s = Serve(env, workdir / "serve.log")
    try:
        s.wait_ready()
        tree = [s.ps, *s.descendants()]
        yield s
        s.proc.send_signal(signal.SIGTERM)
        assert s.wait_exit(40) == 0, s.log()
        assert wait_gone(tree) == [], s.log()
    finally:
        s.close()
