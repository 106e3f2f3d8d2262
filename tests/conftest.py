"""Fixtures for every test directory: portable builds of the compiled CPU kernels (csrc/), to hold their
vector-extension paths (what runs without avx512_bf16, on any x86-64 or ARM gcc) to the native builds. Without a
GPU, Triton kernels run in Triton's interpreter (set here, before anything imports triton)."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.layers.cpu_build import _FAST_MATH, CSRC

# Triton picks interpreter or compiler when a @triton.jit decorator runs, its own library's at `import triton`,
# which transformers' models already cause (through torch._dynamo): so the choice is made here, first, for the
# whole test process. The ahead-of-time compile test compiles in a child process without it.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def portable_build(tmp_path: Path) -> Callable[[str], ctypes.CDLL]:
    """name -> csrc/<name>.c built for baseline x86-64-v2 (no AVX-512 at all; the host's default elsewhere) with
    -Werror, loaded; skips where no C compiler exists."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    arch = ["-march=x86-64-v2"] if platform.machine() in ("x86_64", "AMD64") else []
    flags = ["-O3", *arch, *_FAST_MATH, "-fopenmp", "-shared", "-fPIC", "-Werror"]

    def build(name: str) -> ctypes.CDLL:
        lib_path = tmp_path / f"{name}_portable.so"
        cmd = [compiler, *flags, "-o", str(lib_path), str(CSRC / f"{name}.c"), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True)
        return ctypes.CDLL(str(lib_path))

    return build
