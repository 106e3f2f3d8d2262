"""Every Triton kernel variant compiles to a cubin for sm_80 and sm_90 on a machine without a GPU (Triton's
ptxas), within the shared memory of the smallest GPU of its generation and without real register spills. The
compiling runs in a child process (tests/triton/compile_variants.py) without TRITON_INTERPRET: this process runs
kernels in the interpreter and cannot compile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.triton.compile_variants import ARCHS, VARIANTS, Variant

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SPILL_BYTES = 64  # a few bytes of spilled registers in the widest tiles are harmless; hundreds are a bad config


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, "-m", "tests.triton.compile_variants"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda variant: variant.name)
def test_compiles_to_cubin(compiled: dict[str, dict[str, Any]], variant: Variant, arch: int) -> None:
    result = compiled[f"{variant.name}@sm_{arch}"]
    assert "error" not in result, result.get("error")
    assert "cubin" in result["asm"]
    assert result["shared"] <= ARCHS[arch], f"{result['shared']} bytes of shared memory"
    assert result["spilled"] <= SPILL_BYTES, f"{result['spilled']} bytes spilled ({result['registers']} registers)"
