"""Fixtures for the Triton kernel tests. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton: Triton chooses interpreter or
compiler when a @triton.jit decorator runs, its own library's included). With a GPU the same tests run the
compiled kernels on CUDA tensors. Compiling for a GPUTarget needs the compiler mode, so test_compile.py compiles
in a child process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder  # noqa: E402


def _bf16_dot_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter keeps bfloat16 as raw uint16 and its tl.dot multiplies the bit patterns (upstream
    does not support bf16 arithmetic there: triton-lang/triton#11584, #11585). Widen bf16 operands to float32
    first, through the interpreter's own cast, as the tensor cores do (exact bf16 products, float32 sums)."""
    create_dot = InterpreterBuilder.create_dot

    def widened(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", widened)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the test tensors live: CUDA with a GPU, else the CPU (the interpreter)."""
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="session")
def kernels() -> Iterator[ModuleType]:
    """engine.attention.triton_kernels, checked to be in the mode this process runs kernels in."""
    from engine.attention import triton_kernels

    for fn in (triton_kernels._paged_attention_kernel, tl.zeros):  # ours, and Triton's own library
        if isinstance(fn, InterpretedFunction) == ON_GPU:
            raise RuntimeError(
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} does not fit this machine, or triton was "
                "imported before tests/conftest.py set it"
            )
    with pytest.MonkeyPatch.context() as monkeypatch:
        if not ON_GPU:
            _bf16_dot_shim(monkeypatch)
        yield triton_kernels
