"""ctypes wrapper of csrc/gemm_bf16.c: bf16 matmuls on a weight packed once in pairs along the input dimension
(the vdpbf16ps layout), with the weight stream software-prefetched so that decode-size matmuls overlap memory and
arithmetic. The oneDNN path (cpu_packing.py) and `F.linear` are its twins (GPU, fp32 / fp16, no compiler), and
tests/unit/test_gemm.py holds it to `F.linear`.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.layers.cpu_build import bind, load_library

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]
LANES = 16  # output columns per packed panel


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library("gemm_bf16")
    return None if lib is None else bind_gemm(lib)


def bind_gemm(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument types of a build of csrc/gemm_bf16.c (tests: the portable build)."""
    bind(lib, ["gemm_bf16"], _ARGTYPES)
    return lib


def supports(w: torch.Tensor) -> bool:
    """Whether the weight `w` [out, in] can run the compiled matmul here (CPU, bfloat16, a C compiler)."""
    plain = w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.numel() > 0
    return plain and _lib() is not None


def amx_available() -> bool:
    """Whether this CPU (and OS) runs AMX tiles: there oneDNN's AMX matmuls outrun this AVX-512 kernel."""
    probe = getattr(torch._C._cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def preferred(choice: bool | None) -> bool:
    """Resolve `EngineConfig.cpu_gemm`: None picks the kernel unless AMX is there."""
    return (not amx_available()) if choice is None else choice


@dataclass
class PackedWeight:
    """A weight [n, k] as panels [ceil(n / 16), ceil(k / 2), 16, 2] (zero-padded)."""

    data: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def pack(w: torch.Tensor) -> PackedWeight:
    """w [n, k] (bfloat16) in the kernel's layout: 16 output columns per panel, input pairs interleaved."""
    n, k = w.shape
    n_pad, k_pad = -(-n // LANES) * LANES, k + (k & 1)
    padded = F.pad(w, (0, k_pad - k, 0, n_pad - n)) if (n_pad, k_pad) != (n, k) else w
    data = padded.reshape(n_pad // LANES, LANES, k_pad // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(data, n, k)


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The plain weight [n, k] back (tests)."""
    d = packed.data
    return d.permute(0, 2, 1, 3).reshape(d.shape[0] * LANES, d.shape[1] * 2)[: packed.n, : packed.k]


def linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """x [..., k] (bfloat16; rows may be strided) @ W^T (+ bias [n]) -> [..., n] in bfloat16."""
    lib = lib or _lib()
    if lib is None:
        raise RuntimeError("the compiled matmul is not available; check supports() first")
    if x.dtype != torch.bfloat16 or x.shape[-1] != packed.k:
        raise ValueError(f"need bfloat16 x [..., {packed.k}], got {x.dtype} {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.k) if x.dim() != 2 else x
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, packed.n), dtype=torch.bfloat16)
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    if m:
        lib.gemm_bf16(
            x2.data_ptr(), x2.stride(0), packed.data.data_ptr(), bias.data_ptr() if bias is not None else None,
            y.data_ptr(), packed.n, m, packed.n, packed.k, torch.get_num_threads(),
        )  # fmt: skip
    return y.reshape(*lead, packed.n)
