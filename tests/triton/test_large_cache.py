"""A layer's cache of more than 2^31 elements (a small model's cache on a 141 GB GPU): write_kv and paged_attention
must address its last blocks with 64-bit offsets, from the int32 slots and block tables the Triton backend passes.
The cache is allocated and never filled, so on the CPU it costs address space, not memory: only the pages of the
blocks used are touched (the interpreter runs on the tensors' own storage).
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from tests.triton.cases import SENTINEL, TOL, run_both

BLOCK, KV_HEADS, HEADS, DIM = 16, 1, 2, 16
NUM_BLOCKS = 2**31 // (BLOCK * KV_HEADS * DIM) + 2  # one layer: 2^31 + 512 elements


@pytest.fixture(scope="module")
def big_cache(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_BLOCKS, BLOCK, KV_HEADS, DIM)
    try:
        return torch.empty(shape, dtype=torch.float16, device=device), torch.empty(
            shape, dtype=torch.float16, device=device
        )
    except (RuntimeError, MemoryError) as e:  # a host that refuses to overcommit 8 GiB of address space
        pytest.skip(f"cannot reserve two 4 GiB caches here: {e}")


@pytest.mark.parametrize("splits", [1, 4])
def test_the_last_blocks_of_a_cache_past_2_31_elements(
    kernels: ModuleType, device: torch.device, big_cache: tuple[torch.Tensor, torch.Tensor], splits: int
) -> None:
    k_cache, v_cache = big_cache
    assert k_cache.numel() > 2**31
    g = torch.Generator().manual_seed(splits)
    n = 40  # blocks: the last, block 0, the one before the last
    table = [NUM_BLOCKS - 1, 0, NUM_BLOCKS - 2]
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)], dtype=torch.int32)
    assert int(slots[0]) * KV_HEADS * DIM >= 2**31  # the first token's element offset
    qkv = torch.randn(n, HEADS + 2 * KV_HEADS, DIM, generator=g).half().to(device)
    k, v = qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]
    kernels.write_kv(k, v, k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache[NUM_BLOCKS - 1, 3], k[3]) and torch.equal(v_cache[NUM_BLOCKS - 2, 7], v[39])

    # the whole sequence as a prefill chunk, then its last token as a decode row (split over `splits`)
    for q_len in (n, 1):
        case = {
            "q": qkv[n - q_len :, :HEADS], "k_cache": k_cache, "v_cache": v_cache,
            "block_tables": torch.tensor([table], dtype=torch.int32, device=device),
            "seq_lens": torch.tensor([n], dtype=torch.int32, device=device),
            "query_start_loc": torch.tensor([0, q_len], dtype=torch.int32, device=device),
            "max_query_len": q_len, "scale": DIM**-0.5,
        }  # fmt: skip
        out, ref = run_both(kernels, case, num_kv_splits=splits if q_len == 1 else 1)
        assert not bool((out == SENTINEL).any())
        torch.testing.assert_close(out.float(), ref.float(), **TOL[torch.float16])
