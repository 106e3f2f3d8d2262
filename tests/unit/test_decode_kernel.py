"""The compiled CPU paged-decode kernel against the pure-torch decode path (which the engine tests check
against transformers): float32 and bfloat16, grouped and plain heads, contexts on and off block edges,
block tables in any order, strided queries.
"""

from __future__ import annotations

import pytest
import torch

from engine.layers import cpu_decode_kernel
from engine.layers.attention import Attention, AttentionMetadata


def _case(dtype: torch.dtype, heads: int, kv_heads: int, block_size: int, lens: list[int], seed: int = 0, hd: int = 16):
    g = torch.Generator().manual_seed(seed)
    tables, next_block = [], 0
    for n in lens:
        count = -(-n // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    num_blocks = next_block + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # scatter each sequence's blocks
    tables = [[order[b] for b in t] for t in tables]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    kc = torch.randn(num_blocks, kv_heads, hd, block_size, generator=g).to(dtype)  # K blocks are transposed
    vc = torch.randn(num_blocks, kv_heads, block_size, hd, generator=g).to(dtype)
    qk = torch.randn(len(lens), heads + kv_heads, hd, generator=g).to(dtype)
    return qk[:, :heads], kc, vc, bt, torch.tensor(lens)  # q is a strided view, as in the model


def _torch_decode(q, kc, vc, bt, lens) -> torch.Tensor:
    heads, kv_heads, hd = q.shape[1], kc.shape[1], q.shape[2]
    pad = torch.arange(bt.shape[1] * vc.shape[2])[None] >= lens[:, None]
    mask = torch.zeros(pad.shape).masked_fill_(pad, float("-inf"))[:, None, None, :]
    meta = AttentionMetadata(torch.empty(0), num_decodes=len(lens), decode_block_tables=bt, decode_mask=mask)
    return Attention(heads, kv_heads, hd, hd**-0.5)._decode(q, kc, vc, meta)


def test_the_kernel_builds_here() -> None:
    assert cpu_decode_kernel.load_kernel() is not None, "a C compiler is on every machine we test on"


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize(("block_size", "lens"), [(4, [1, 4, 5, 13]), (16, [1, 16, 33, 100, 7]), (64, [200])])
def test_kernel_matches_the_torch_path(dtype, tol, heads, kv_heads, block_size, lens) -> None:
    q, kc, vc, bt, ctx = _case(dtype, heads, kv_heads, block_size, lens)
    got = cpu_decode_kernel.paged_decode(q, kc, vc, bt, ctx, q.shape[2] ** -0.5)
    want = _torch_decode(q, kc, vc, bt, ctx)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_head_dims(head_dim: int, dtype: torch.dtype) -> None:
    """Whole 64-lane groups, single 16-lane tiles and scalar tails of the head dimension."""
    q, kc, vc, bt, ctx = _case(dtype, 8, 2, 16, [1, 15, 16, 70, 129], seed=3, hd=head_dim)
    got = cpu_decode_kernel.paged_decode(q, kc, vc, bt, ctx, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), _torch_decode(q, kc, vc, bt, ctx).float(), atol=tol, rtol=tol)


def test_kernel_reads_only_each_sequences_own_context() -> None:
    """Garbage (huge values) past each sequence's length, in its last block and in padding, changes nothing."""
    q, kc, vc, bt, ctx = _case(torch.float32, 4, 2, 8, [3, 9, 16])
    clean = cpu_decode_kernel.paged_decode(q, kc, vc, bt, ctx, 0.25)
    for row, n in enumerate(ctx.tolist()):
        last = bt[row, (n - 1) // 8]
        kc[last, :, :, n % 8 or 8 :] = 1e4
        vc[last, :, n % 8 or 8 :] = 1e4
    torch.testing.assert_close(cpu_decode_kernel.paged_decode(q, kc, vc, bt, ctx, 0.25), clean)
