"""Tile sizes, compile-time arguments and compiler options of the Triton attention kernels, chosen in one place:
the launchers in triton_kernels.py and the ahead-of-time compile test (tests/triton/compile_variants.py) both
read them, so the variants compiled there are the ones launched. Plain Python: importable without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# fp fusion stated, not left to Triton's default (which changes in Triton 3.10)
WRITE_KV_OPTIONS: dict[str, Any] = {"num_warps": 4, "num_stages": 1, "enable_fp_fusion": True}
MERGE_OPTIONS: dict[str, Any] = {"num_warps": 4, "num_stages": 1, "enable_fp_fusion": True}
MAX_KV_SPLITS = 64


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class TileConfig:
    """One attention launch's tiling: block_m rows = block_q query tokens x the padded query-head group;
    block_n keys per inner step."""

    block_m: int
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}


def tile_config(head_dim: int, dtype: torch.dtype, group: int, max_query_len: int) -> TileConfig:
    """Decode-only batches get the smallest M tl.dot takes (16 rows), prefill 64; float32 (IEEE dots, on the FMA
    units) small key tiles and 32 rows at head dim 256. tests/triton/test_compile.py holds every variant to the
    shared memory of sm_86/89 and sm_90 and to (next to) no register spills."""
    group_pad, dim_pad = next_pow2(group), next_pow2(head_dim)
    decode = max_query_len <= 1
    if dtype == torch.float32:
        block_m = max(16 if decode else 32 if dim_pad >= 256 else 64, group_pad)
        return TileConfig(block_m, block_m // group_pad, block_n=16, num_warps=8, num_stages=2)
    block_m = max(16 if decode else 64, group_pad)
    block_n = 64 if dim_pad <= 128 else 32
    num_warps = 8 if block_m * dim_pad >= 64 * 128 else 4
    return TileConfig(block_m, block_m // group_pad, block_n, num_warps, num_stages=2)


def attention_constexprs(
    head_dim: int, dtype: torch.dtype, group: int, block_size: int, max_query_len: int,
    *, sliding_window: bool, softcap: bool, alibi: bool, num_kv_splits: int = 1,
) -> tuple[dict[str, Any], TileConfig]:  # fmt: skip
    """_paged_attention_kernel's compile-time arguments for one variant, and its tiling."""
    tiles = tile_config(head_dim, dtype, group, max_query_len)
    constexprs = {
        "GROUP": group, "GROUP_PAD": next_pow2(group), "BLOCK_Q": tiles.block_q, "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n, "HEAD_DIM": head_dim, "DIM_PAD": next_pow2(head_dim), "BLOCK_SIZE": block_size,
        "USE_WINDOW": sliding_window, "USE_SOFTCAP": softcap, "USE_ALIBI": alibi, "NUM_SPLITS": num_kv_splits,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }  # fmt: skip
    return constexprs, tiles


def write_kv_constexprs(num_kv_heads: int, head_dim: int) -> dict[str, Any]:
    return {
        "NUM_KV_HEADS": num_kv_heads, "HEAD_DIM": head_dim,
        "HEADS_PAD": next_pow2(num_kv_heads), "DIM_PAD": next_pow2(head_dim),
    }  # fmt: skip


def merge_constexprs(num_kv_splits: int, head_dim: int) -> dict[str, Any]:
    return {
        "NUM_SPLITS": num_kv_splits, "SPLITS_PAD": next_pow2(num_kv_splits),
        "HEAD_DIM": head_dim, "DIM_PAD": next_pow2(head_dim),
    }  # fmt: skip


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """A split count for a decode-only batch (host ints only, so a CUDA graph for a padded batch size can fix
    it): split the keys only when sequences x KV heads leave SMs idle, into pieces of at least 256 keys, to
    fill about two waves. Not tuned on hardware yet."""
    programs = max(num_seqs * num_kv_heads, 1)
    if programs >= num_sms:
        return 1
    return max(1, min(-(-2 * num_sms // programs), -(-max_seq_len // 256), MAX_KV_SPLITS))
