"""write_kv (the Triton kernel that stores a step's new keys and values in the paged cache) against plain
indexing of the cache viewed as [num_blocks * block_size, Hkv, D]: strided k / v rows (views of a fused qkv
tensor), uneven head counts, a non power of two head dim, negative slots (padded rows) left unwritten.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch


@pytest.mark.parametrize(
    ("dtype", "kv_heads", "head_dim", "block_size"),
    [(torch.float32, 2, 64, 16), (torch.bfloat16, 3, 80, 32), (torch.float16, 1, 128, 16)],
    ids=["fp32-2x64", "bf16-3x80", "fp16-1x128"],
)
def test_write_kv_matches_indexing(
    kernels: ModuleType, device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, block_size: int
) -> None:
    g = torch.Generator().manual_seed(kv_heads)
    num_blocks, heads, tokens = 5, 4, 9
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g).to(dtype).to(device)
    k, v = qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]  # strided rows, heads contiguous
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[2, 5]] = -1  # padded rows
    slots = slots.to(device)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype).to(device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    want_k.view(-1, kv_heads, head_dim)[slots[keep]] = k[keep]
    want_v.view(-1, kv_heads, head_dim)[slots[keep]] = v[keep]

    kernels.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # the slot at block b, offset o holds the row: the layout the attention kernel reads
    row = 0 if int(slots[0]) >= 0 else 1
    block, offset = divmod(int(slots[row]), block_size)
    assert torch.equal(k_cache[block, offset], k[row]) and torch.equal(v_cache[block, offset], v[row])


def test_write_kv_empty_and_bad_shapes(kernels: ModuleType, device: torch.device) -> None:
    cache = torch.zeros(2, 16, 2, 64, device=device)
    empty = torch.empty(0, 2, 64, device=device)
    kernels.write_kv(empty, empty, cache, cache.clone(), torch.empty(0, dtype=torch.int64, device=device))
    assert not cache.any()
    rows = torch.ones(3, 2, 64, device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.write_kv(rows, rows, cache, cache.clone(), torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.write_kv(
            rows[:, :1], rows[:, :1], cache, cache.clone(), torch.zeros(3, dtype=torch.int64, device=device)
        )
