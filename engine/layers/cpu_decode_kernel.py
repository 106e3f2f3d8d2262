"""The CPU fast path of paged decode attention: csrc/paged_decode.c, built by cpu_build at first use and
called through ctypes. It reads K/V blocks in place through the block table; the pure-torch path in
attention.py (gather + blockwise matmuls) is its twin wherever the kernel cannot be built (no compiler), on
CUDA, and for float16.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from engine.layers.cpu_build import bind, load_library

_SYMBOLS = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int]


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built here."""
    lib = load_library("paged_decode")
    if lib is not None:
        bind(lib, list(_SYMBOLS.values()), _ARGTYPES)
    return lib


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decodes of a `dtype` cache on `device` can run the kernel here."""
    return device.type == "cpu" and dtype in _SYMBOLS and load_kernel() is not None


def paged_decode(
    q: torch.Tensor,  # [D, H, hd], rows may be strided (a view of the fused qk tensor)
    k_cache: torch.Tensor,  # [num_blocks, Hkv, hd, block_size], contiguous
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, hd], contiguous
    block_tables: torch.Tensor,  # [D, M] int64, padded
    context_lens: torch.Tensor,  # [D] int64, >= 1
    scale: float,
) -> torch.Tensor:
    """Attention of each decode row over its cached tokens -> [D, H, hd]."""
    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the decode-attention kernel is not available; check supports() first")
    d, h, hd = q.shape
    if q.stride(2) != 1 or q.stride(1) != hd:
        q = q.contiguous()
    _, hkv, bs, _ = v_cache.shape
    bt = block_tables.contiguous()
    lens = context_lens.contiguous()
    out = torch.empty((d, h, hd), dtype=q.dtype)
    getattr(lib, _SYMBOLS[q.dtype])(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(), lens.data_ptr(),
        out.data_ptr(), d, bt.shape[1], h, hkv, bs, hd, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out
