"""ctypes wrapper of csrc/gemm_q.c, the CPU's weight-only int4 / int8 matmul: `pack` lays an IntWeight out in the
kernel's panels once after loading, `linear` runs it, and `unpack` gives the IntWeight back, which the slow twin
(dequantize, then `F.linear`) and the tests use.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.layers.cpu_build import bind, load_library
from engine.quant.int_weight import OFFSET_KINDS, IntWeight

LANES = 16  # outputs per panel
# The plan's names for this kernel (engine/plan.py: resolve_quant_kernel): AVX-512 (or portable) code only, or with
# int4 on AMX tiles from 3 rows (csrc/gemm_q_amx.h; fewer rows stay on AVX-512)
KERNELS = ("cpu_kernel", "cpu_amx")
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ARGTYPES = [_P, _I64, _P, _P, _P, _INT, _INT, _I64, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library("gemm_q")
    return None if lib is None else bind_gemm_q(lib)


def bind_gemm_q(lib: ctypes.CDLL) -> ctypes.CDLL:
    bind(lib, ["gemm_q"], _ARGTYPES)
    bind(lib, ["gemm_q_desc"], [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _INT])
    lib.gemm_q_amx_init.argtypes, lib.gemm_q_amx_init.restype = [], _INT
    lib.gemm_q_amx_calls.argtypes, lib.gemm_q_amx_calls.restype = [], _I64
    return lib


class QDesc(ctypes.Structure):
    """A packed weight as csrc/gemm_q.c's gemm_q_desc reads it (the decoder stack's GEMM pointer takes one)."""

    _fields_ = [
        ("codes", _P), ("scales", _P), ("offsets", _P), ("bits", _I64), ("offset_kind", _I64), ("group", _I64),
        ("amx", _I64),
    ]  # fmt: skip


def available() -> bool:
    return _lib() is not None


@functools.cache
def amx_available() -> bool:
    """Whether int4 runs on AMX tiles here: built for a CPU with AMX-BF16 and the OS grants the tile state."""
    lib = _lib()
    return lib is not None and bool(lib.gemm_q_amx_init())


def kernel_name() -> str:
    """The plan's name for this kernel on this CPU (one of KERNELS)."""
    return "cpu_amx" if amx_available() else "cpu_kernel"


def amx_calls() -> int:
    """How many matmuls have run on AMX tiles in this process (for tests: which path ran)."""
    lib = _lib()
    return 0 if lib is None else int(lib.gemm_q_amx_calls())


def supports(w: IntWeight) -> bool:
    """Groups of a multiple of 8 inputs (int4 codes come in quads of pair steps)."""
    return w.group_size % 8 == 0 and w.bits in (4, 8)


@dataclass
class PackedInt:
    codes: torch.Tensor  # uint8 panels, see csrc/gemm_q.c
    scales: torch.Tensor  # [panels, G, 16] float16
    offsets: torch.Tensor | None  # [panels, G, 16] float16
    bits: int
    offset_kind: str
    group_size: int
    n: int
    k: int
    perm: torch.Tensor | None  # [K] inputs gathered in this order before the matmul (act-order)
    amx: bool = False  # int4 with groups of 32k inputs on AMX tiles (the plan's "cpu_amx"; amx_available())

    def desc(self) -> QDesc:
        """The descriptor for gemm_q_desc (it points into this weight's tensors: keep the weight alive)."""
        offsets = None if self.offsets is None else self.offsets.data_ptr()
        kind = OFFSET_KINDS.index(self.offset_kind)
        return QDesc(
            self.codes.data_ptr(), self.scales.data_ptr(), offsets, self.bits, kind, self.group_size, int(self.amx)
        )

    @property
    def nbytes(self) -> int:
        extra = 0 if self.perm is None else self.perm.numel() * self.perm.element_size()
        off = 0 if self.offsets is None else self.offsets.numel() * 2
        return self.codes.numel() + self.scales.numel() * 2 + off + extra


def _panels(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, X] -> [N_pad/16, X, 16] (outputs padded with zeros)."""
    t = F.pad(t, (0, 0, 0, n_pad - t.shape[0]))
    return t.view(n_pad // LANES, LANES, t.shape[1]).transpose(1, 2).contiguous()


def pack(w: IntWeight) -> PackedInt:
    n, k = w.shape
    n_pad = -(-n // LANES) * LANES
    codes = F.pad(w.codes, (0, 0, 0, n_pad - n)).view(n_pad // LANES, LANES, k // 2, 2)
    codes = codes.permute(0, 2, 1, 3).reshape(n_pad // LANES, k // 2, 2 * LANES)  # [panel, pair step, element]
    if w.bits == 4:
        quads = codes.view(n_pad // LANES, k // 8, 4, 2 * LANES).to(torch.int32)  # pair steps 4t..4t+3
        data = quads[:, :, 0] | (quads[:, :, 1] << 4) | (quads[:, :, 2] << 8) | (quads[:, :, 3] << 12)
        data = data.to(torch.int16).contiguous().view(torch.uint8)  # [panel, quad, element] uint16, little-endian
    else:
        data = codes.contiguous().view(torch.uint8)
    offsets = None if w.offsets is None else _panels(w.offsets, n_pad)
    return PackedInt(
        data.view(-1), _panels(w.scales, n_pad), offsets, w.bits, w.offset_kind, w.group_size, n, k, w.perm
    )


def unpack(p: PackedInt) -> IntWeight:
    panels = p.scales.shape[0]
    if p.bits == 4:
        data = p.codes.view(torch.int16).view(panels, p.k // 8, 1, 2 * LANES).to(torch.int32) & 0xFFFF
        codes = torch.cat([(data >> (4 * j)) & 15 for j in range(4)], dim=2).to(torch.uint8)
        codes = codes.view(panels, p.k // 2, 2 * LANES)
    else:
        codes = p.codes.view(torch.int8).view(panels, p.k // 2, 2 * LANES)
    codes = codes.view(panels, p.k // 2, LANES, 2).permute(0, 2, 1, 3).reshape(panels * LANES, p.k)[: p.n]

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(panels * LANES, -1)[: p.n]

    offsets = None if p.offsets is None else rows(p.offsets)
    return IntWeight(p.bits, codes, rows(p.scales), offsets, p.offset_kind, p.group_size, p.perm)


def linear(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None, lib: ctypes.CDLL | None = None):
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype (computed from bf16 x, see csrc/gemm_q.c)."""
    lib = lib or _lib()
    if lib is None:
        raise RuntimeError("the compiled int matmul is not available; check available() first")
    dtype, lead = x.dtype, x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if p.perm is not None:
        x2 = x2.index_select(1, p.perm)
    x2 = x2.to(torch.bfloat16)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, p.n), dtype=torch.bfloat16)
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    if m:
        lib.gemm_q(
            x2.data_ptr(), x2.stride(0), p.codes.data_ptr(), p.scales.data_ptr(),
            None if p.offsets is None else p.offsets.data_ptr(), p.bits, OFFSET_KINDS.index(p.offset_kind),
            p.group_size, None if bias is None else bias.data_ptr(), y.data_ptr(), p.n, m, p.n, p.k, int(p.amx),
            torch.get_num_threads(),
        )  # fmt: skip
    y = y.reshape(*lead, p.n)
    return y if dtype == torch.bfloat16 else y.to(dtype)
