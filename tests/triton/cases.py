"""Shared by the Triton kernel tests: random paged-attention inputs, and the kernel run next to the pure-torch
reference on the same inputs. Tolerances: float32 1e-5 (the kernel's dots are IEEE float32); float16 / bfloat16
2e-2 / 3e-2 (the probabilities are rounded to the cache dtype before P @ V, the output to the query dtype).
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

import torch

from engine.attention.paged_reference import paged_attention_reference

KERNEL_ONLY = ("num_kv_splits",)  # paged_attention options the reference does not take (they change no result)
SENTINEL = 123.0  # out is prefilled with it: rows the kernel must not write keep it
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


def make_case(
    q_lens: list[int], seq_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, device: torch.device, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of paged_attention (less out): random q rows (a strided view of a fused qkv tensor) and
    a cache whose every slot holds random values, each sequence's blocks scattered over it in random order."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(counts) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.zeros(len(seq_lens), max(max(counts), 1), dtype=torch.int32)
    used = 0
    for s, count in enumerate(counts):
        block_tables[s, :count] = torch.tensor(order[used : used + count], dtype=torch.int32)
        used += count
    shape = (num_blocks, block_size, kv_heads, head_dim)
    qkv = torch.randn(sum(q_lens), heads + 2 * kv_heads, head_dim, generator=g).to(dtype)
    case = {
        "k_cache": torch.randn(shape, generator=g).to(dtype),
        "v_cache": torch.randn(shape, generator=g).to(dtype),
        "block_tables": block_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "query_start_loc": torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
    }
    case = {k: v.to(device) for k, v in case.items()}
    return {"q": qkv.to(device)[:, :heads], **case, "max_query_len": max(q_lens), "scale": head_dim**-0.5}


def run_both(kernels: ModuleType, case: dict[str, Any], **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    q = case["q"]
    out = torch.full(q.shape, SENTINEL, dtype=q.dtype, device=q.device)
    ref = out.clone()
    returned = kernels.paged_attention(out=out, **case, **options)
    assert returned is out
    paged_attention_reference(out=ref, **case, **{k: v for k, v in options.items() if k not in KERNEL_ONLY})
    return out, ref


def check(kernels: ModuleType, case: dict[str, Any], **options: Any) -> torch.Tensor:
    out, ref = run_both(kernels, case, **options)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[out.dtype])
    return out
