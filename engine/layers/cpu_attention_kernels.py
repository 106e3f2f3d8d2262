"""The CPU fast paths of paged attention, built by cpu_build at first use and called through ctypes:
csrc/paged_decode.c (decode rows over the plain cache layout, float32 and bfloat16) and csrc/paired_attention.c
(decode and prefill rows over the paired bfloat16 layout, vdpbf16ps where the CPU has it). Both read K/V blocks in
place through block tables; the pure-torch paths in attention.py are their twins (no compiler, CUDA, float16).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from engine.layers.cpu_build import bind, load_library

_SYMBOLS = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}
_PAIRED = "paired_attention_bf16"
_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_ARGTYPES = [_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F, _INT]
_PAIRED_ARGTYPES = [_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _F, _INT]
PREFILL_GROUP = 16  # prefill rows per task: they share each K/V tile the task loads


@dataclass
class KernelRows:
    """Query rows of one paired-kernel call: row r attends over cache tokens [0, row_ctx[r]) of its group's table."""

    tables: torch.Tensor  # [S, M] int64 block tables, padded with block 0
    group_starts: torch.Tensor  # [W + 1] int64: group w is rows [group_starts[w], group_starts[w + 1])
    group_tables: torch.Tensor  # [W] int64: the row of `tables` that group w reads
    row_ctx: torch.Tensor  # [N] int64, >= 1

    @property
    def num_rows(self) -> int:
        return self.row_ctx.shape[0]


def kernel_rows(
    decode_tables: list[list[int]], decode_lens: list[int], chunks: list[tuple[int, int, list[int]]]
) -> KernelRows:
    """Decode rows (one group each), then the rows of each prefill chunk (start, end, table) in groups of
    PREFILL_GROUP; the query at position p attends over positions [0, p]."""
    tables, ctx = [*decode_tables, *(t for _, _, t in chunks)], list(decode_lens)
    starts, group_tables = list(range(len(ctx) + 1)), list(range(len(ctx)))
    for i, (start, end, _) in enumerate(chunks, start=len(decode_tables)):
        for g0 in range(start, end, PREFILL_GROUP):
            ctx.extend(range(g0 + 1, min(g0 + PREFILL_GROUP, end) + 1))
            starts.append(len(ctx))
            group_tables.append(i)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    return KernelRows(padded, torch.tensor(starts), torch.tensor(group_tables), torch.tensor(ctx))


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled plain-layout library, or None where it cannot be built here."""
    lib = load_library("paged_decode")
    if lib is not None:
        bind(lib, list(_SYMBOLS.values()), _ARGTYPES)
    return lib


@functools.cache
def load_paired_kernel() -> ctypes.CDLL | None:
    """The compiled paired-layout library, or None where it cannot be built here."""
    lib = load_library("paired_attention")
    return None if lib is None else bind_paired(lib)


def bind_paired(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument types of a build of csrc/paired_attention.c."""
    bind(lib, [_PAIRED], _PAIRED_ARGTYPES)
    return lib


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decodes of a `dtype` cache on `device` can run the plain-layout kernel here."""
    return device.type == "cpu" and dtype in _SYMBOLS and load_kernel() is not None


def supports_paired(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """Whether a cache of these parameters can take the paired layout and its kernel (even pairs of dims/tokens)."""
    ok = device.type == "cpu" and dtype == torch.bfloat16 and head_dim % 2 == 0 and block_size % 2 == 0
    return ok and load_paired_kernel() is not None


def _rows_of(q: torch.Tensor) -> torch.Tensor:
    """q [N, H, hd] with heads contiguous within each row (a row may be a view of the fused qkv tensor)."""
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def paged_decode(
    q: torch.Tensor,  # [D, H, hd], rows may be strided (a view of the fused qk tensor)
    k_cache: torch.Tensor,  # [num_blocks, Hkv, hd, block_size], contiguous
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, hd], contiguous
    block_tables: torch.Tensor,  # [D, M] int64, padded
    context_lens: torch.Tensor,  # [D] int64, >= 1
    scale: float,
) -> torch.Tensor:
    """Attention of each decode row over its cached tokens (plain layout) -> [D, H, hd]."""
    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the decode-attention kernel is not available; check supports() first")
    q = _rows_of(q)
    d, h, hd = q.shape
    _, hkv, bs, _ = v_cache.shape
    bt, lens = block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty((d, h, hd), dtype=q.dtype)
    getattr(lib, _SYMBOLS[q.dtype])(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), bt.data_ptr(), lens.data_ptr(),
        out.data_ptr(), d, bt.shape[1], h, hkv, bs, hd, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out


def paired_attention(
    q: torch.Tensor,  # [N, H, hd] bfloat16, rows may be strided
    k_cache: torch.Tensor,  # [num_blocks, Hkv, hd / 2, block_size, 2] bfloat16, contiguous
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size / 2, hd, 2] bfloat16, contiguous
    rows: KernelRows,  # N rows
    scale: float,
    lib: ctypes.CDLL | None = None,  # another build of csrc/paired_attention.c (tests: the portable fallback)
) -> torch.Tensor:
    """Attention of each row over its cached tokens (paired layout) -> [N, H, hd]."""
    lib = lib or load_paired_kernel()
    if lib is None:
        raise RuntimeError("the paired attention kernel is not available; check supports_paired() first")
    q = _rows_of(q)
    n, h, hd = q.shape
    _, hkv, half_bs, _, _ = v_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and n == rows.num_rows
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (hd // 2, 2 * half_bs, 2)
    out = torch.empty((n, h, hd), dtype=q.dtype)
    lib.paired_attention_bf16(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), rows.tables.data_ptr(),
        rows.tables.shape[1], rows.group_starts.data_ptr(), rows.group_tables.data_ptr(), rows.group_tables.shape[0],
        rows.row_ctx.data_ptr(), out.data_ptr(), h, hkv, 2 * half_bs, hd, scale, torch.get_num_threads(),
    )  # fmt: skip
    return out
