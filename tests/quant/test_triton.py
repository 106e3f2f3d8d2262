"""The GPU int4 / int8 dequantize-GEMM (engine/quant/triton_kernel.py) without a GPU: run by Triton's interpreter
on CPU tensors against the dequantizing twin (AWQ / GPTQ zero points, act-order, mins, int8; float32 and float16:
the interpreter's bfloat16 `tl.dot` is broken), and compiled ahead of time for sm_80 and sm_90 in every variant the
engine launches. Each in a child process (tests/quant/triton_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(mode: str, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", "tests.quant.triton_check", mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_interpreted_kernel_matches_its_twin() -> None:
    errors = _run("interpret", interpret=True)
    assert len(errors) == 4 * 3 * 2
    for key, err in errors.items():
        assert err < (1e-5 if key.endswith("float32") else 2e-3), (key, err)  # float16: the dot's inputs rounded


def test_every_variant_compiles_for_sm80_and_sm90() -> None:
    sizes = _run("compile", interpret=False)
    assert len(sizes) == 2 * 3 * 3 * 2 and all(n > 10_000 for n in sizes.values())
