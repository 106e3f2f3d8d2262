"""Loading the compiled CPU kernels leaves the process's floating-point mode alone: with -ffast-math at link time,
GCC < 13 adds a constructor that sets flush-to-zero / denormals-are-zero for the whole process, after which Python
reads 5e-324 as 0 and torch flushes subnormal results."""

from __future__ import annotations

import pytest
import torch

from engine.layers.cpu_build import CSRC, load_library


def test_loading_every_kernel_keeps_subnormals() -> None:
    names = sorted(p.stem for p in CSRC.glob("*.c"))
    loaded = [name for name in names if load_library(name) is not None]
    if not loaded:
        pytest.skip("no C compiler: nothing is loaded")
    tiny = 5e-324
    assert tiny > 0, "denormals-are-zero is on after loading " + ", ".join(loaded)
    assert float(torch.tensor([1e-39]) * 1.0) != 0.0, "flush-to-zero is on"
