"""The compiled CPU attention kernels against the pure-torch decode path (which the engine tests check against
transformers): the plain-layout decode kernel (float32, bfloat16) and the paired-layout bf16 kernel (decode and
prefill rows, its portable build too); grouped and plain heads, contexts on and off block edges, block tables in
any order, strided queries.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention.cpu import CpuPairedBackend
from engine.attention.torch_twin import TorchBackend, TwinMetadata, pair, unpair
from engine.layers import cpu_attention_kernels
from engine.layers.attention import Attention


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


def _twin(q, kc, vc, bt, lens, paired: bool = False) -> torch.Tensor:
    """The torch twin's decode over a plain or paired cache."""
    heads, kv_heads, hd, bs = q.shape[1], kc.shape[1], q.shape[2], kc.shape[3]
    pad = torch.arange(bt.shape[1] * bs)[None] >= lens[:, None]
    mask = torch.zeros(pad.shape).masked_fill_(pad, float("-inf"))[:, None, None, :]
    meta = TwinMetadata(num_decodes=len(lens), decode_block_tables=bt, decode_mask=mask)
    backend = TorchBackend(torch.device("cpu"), q.dtype, bs)
    backend.paired = paired
    attn = Attention(heads, kv_heads, hd, hd**-0.5)
    attn.k_cache, attn.v_cache = kc, vc
    return backend._decode(attn, q, meta)


def _torch_decode(q, kc, vc, bt, lens) -> torch.Tensor:
    return _twin(q, kc, vc, bt, lens)


def test_the_kernel_builds_here() -> None:
    assert cpu_attention_kernels.load_kernel() is not None, "a C compiler is on every machine we test on"


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize(("block_size", "lens"), [(4, [1, 4, 5, 13]), (16, [1, 16, 33, 100, 7]), (64, [200])])
def test_kernel_matches_the_torch_path(dtype, tol, heads, kv_heads, block_size, lens) -> None:
    q, kc, vc, bt, ctx = _case(dtype, heads, kv_heads, block_size, lens)
    got = cpu_attention_kernels.paged_decode(q, kc, vc, bt, ctx, q.shape[2] ** -0.5)
    want = _torch_decode(q, kc, vc, bt, ctx)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_head_dims(head_dim: int, dtype: torch.dtype) -> None:
    """Whole 64-lane groups, single 16-lane tiles and scalar tails of the head dimension."""
    q, kc, vc, bt, ctx = _case(dtype, 8, 2, 16, [1, 15, 16, 70, 129], seed=3, hd=head_dim)
    got = cpu_attention_kernels.paged_decode(q, kc, vc, bt, ctx, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), _torch_decode(q, kc, vc, bt, ctx).float(), atol=tol, rtol=tol)


def test_kernel_reads_only_each_sequences_own_context() -> None:
    """Garbage (huge values) past each sequence's length, in its last block and in padding, changes nothing."""
    q, kc, vc, bt, ctx = _case(torch.float32, 4, 2, 8, [3, 9, 16])
    clean = cpu_attention_kernels.paged_decode(q, kc, vc, bt, ctx, 0.25)
    for row, n in enumerate(ctx.tolist()):
        last = bt[row, (n - 1) // 8]
        kc[last, :, :, n % 8 or 8 :] = 1e4
        vc[last, :, n % 8 or 8 :] = 1e4
    torch.testing.assert_close(cpu_attention_kernels.paged_decode(q, kc, vc, bt, ctx, 0.25), clean)


# The paired ("VNNI") layout and its kernel: decode rows against the torch twin reading the same paired cache,
# prefill rows against a float32 reference, the portable (no avx512_bf16) build against the native one.


def _paired_case(heads: int, kv_heads: int, block_size: int, lens: list[int], hd: int = 64, seed: int = 0):
    q, kc, vc, bt, ctx = _case(torch.bfloat16, heads, kv_heads, block_size, lens, seed=seed, hd=hd)
    return q, pair(kc).contiguous(), pair(vc).contiguous(), bt, ctx


def _decode_rows(bt: torch.Tensor, ctx: torch.Tensor) -> cpu_attention_kernels.KernelRows:
    return cpu_attention_kernels.kernel_rows(bt.tolist(), ctx.tolist(), [])


def test_paired_layout_round_trip_and_twin() -> None:
    q, kc, vc, bt, ctx = _case(torch.bfloat16, 6, 2, 8, [3, 8, 21])
    assert torch.equal(unpair(pair(kc)), kc) and torch.equal(unpair(pair(vc)), vc)
    paired_backend = CpuPairedBackend(torch.device("cpu"), torch.bfloat16, 8, fused_write=False)
    assert pair(kc).shape == paired_backend.cache_shapes(kc.shape[0], 2, 16)[0]
    assert pair(vc).shape == paired_backend.cache_shapes(kc.shape[0], 2, 16)[1]
    assert pair(kc)[1, 0, 3, 5, 1].item() == kc[1, 0, 7, 5].item()  # dims 2i, 2i + 1 of token t side by side
    assert pair(vc)[1, 0, 2, 5, 1].item() == vc[1, 0, 5, 5].item()  # tokens 2t, 2t + 1 of dim i side by side
    plain = _twin(q, kc, vc, bt, ctx, paired=False)
    torch.testing.assert_close(_twin(q, pair(kc).contiguous(), pair(vc).contiguous(), bt, ctx, paired=True), plain)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (9, 3), (8, 1)])  # GQA groups 1, 3, 8
@pytest.mark.parametrize("hd", [64, 80, 96, 128, 16, 24])
@pytest.mark.parametrize(("block_size", "lens"), [(4, [1, 4, 5, 13]), (16, [1, 16, 33, 100, 7]), (64, [200, 63, 129])])
def test_paired_kernel_matches_the_twin(heads, kv_heads, hd, block_size, lens) -> None:
    q, kc, vc, bt, ctx = _paired_case(heads, kv_heads, block_size, lens, hd=hd, seed=hd)
    got = cpu_attention_kernels.paired_attention(q, kc, vc, _decode_rows(bt, ctx), hd**-0.5)
    want = _twin(q, kc, vc, bt, ctx, paired=True)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_paired_layout_needs_even_dims_and_blocks() -> None:
    cpu = torch.device("cpu")
    assert cpu_attention_kernels.supports_paired(cpu, torch.bfloat16, 64, 64)
    assert not cpu_attention_kernels.supports_paired(cpu, torch.bfloat16, 63, 64)  # odd head_dim: plain layout
    assert not cpu_attention_kernels.supports_paired(cpu, torch.bfloat16, 64, 1)  # odd block size: plain layout
    assert not cpu_attention_kernels.supports_paired(cpu, torch.float32, 64, 64)
    assert not cpu_attention_kernels.supports_paired(torch.device("meta"), torch.bfloat16, 64, 64)


def test_paired_kernel_ignores_garbage_past_the_context() -> None:
    """NaN in K and V past each context (an odd context leaves half of a V pair outside) changes nothing."""
    q, kc, vc, bt, ctx = _paired_case(9, 3, 8, [3, 9, 16, 5])
    rows = _decode_rows(bt, ctx)
    clean = cpu_attention_kernels.paired_attention(q, kc, vc, rows, 0.125)
    for row, n in enumerate(ctx.tolist()):
        last, used = bt[row, (n - 1) // 8], n % 8 or 8
        unpair(kc)[last, :, :, used:] = float("nan")
        unpair(vc)[last, :, used:] = float("nan")
    torch.testing.assert_close(cpu_attention_kernels.paired_attention(q, kc, vc, rows, 0.125), clean)


def _reference_rows(q, kc, vc, tables: list[list[int]], ctx: list[int], which: list[int]) -> torch.Tensor:
    """float32 attention of row r over tokens [0, ctx[r]) of tables[which[r]] (paired cache)."""
    k_plain, v_plain = unpair(kc).float(), unpair(vc).float()  # [nb, Hkv, hd, bs], [nb, Hkv, bs, hd]
    g = q.shape[1] // kc.shape[1]
    out = []
    for r, (n, t) in enumerate(zip(ctx, which)):
        blocks = torch.tensor(tables[t])
        ks = k_plain[blocks].permute(1, 0, 3, 2).flatten(1, 2)[:, :n].repeat_interleave(g, 0)  # [H, n, hd]
        vs = v_plain[blocks].transpose(0, 1).flatten(1, 2)[:, :n].repeat_interleave(g, 0)
        p = torch.softmax((ks @ q[r].float().unsqueeze(-1)).squeeze(-1) * q.shape[2] ** -0.5, -1)  # [H, n]
        out.append((p.unsqueeze(1) @ vs).squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("block_size", [4, 16, 64])
def test_paired_kernel_runs_decode_and_prefill_rows_together(block_size: int) -> None:
    """Two decode rows, a fresh prompt of 37 tokens and a chunk [20, 45) after a cached prefix, in one call."""
    g = torch.Generator().manual_seed(5)
    lens = [7, 70, 37, 45]
    _, kc, vc, bt, _ = _paired_case(9, 3, block_size, lens, hd=64, seed=5)
    tables = [row[: -(-n // block_size)] for row, n in zip(bt.tolist(), lens)]
    chunks = [(0, 37, tables[2]), (20, 45, tables[3])]
    rows = cpu_attention_kernels.kernel_rows(tables[:2], lens[:2], chunks)
    ctx = [7, 70, *range(1, 38), *range(21, 46)]
    which = [0, 1] + [2] * 37 + [3] * 25
    assert rows.row_ctx.tolist() == ctx and rows.num_rows == len(ctx)
    q = torch.randn(len(ctx), 9 + 6, 64, generator=g).bfloat16()[:, :9]  # strided rows, as in the model
    got = cpu_attention_kernels.paired_attention(q, kc, vc, rows, 64**-0.5)
    want = _reference_rows(q, kc, vc, tables, ctx, which)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_portable_build_matches_the_native_one(portable_build) -> None:
    """csrc/paired_attention.c without avx512_bf16 (GCC vector extensions only) computes the same thing."""
    portable = cpu_attention_kernels.bind_paired(portable_build("paired_attention"))
    q, kc, vc, bt, ctx = _paired_case(9, 3, 16, [1, 16, 33, 100, 7], hd=80)
    rows = _decode_rows(bt, ctx)
    got = cpu_attention_kernels.paired_attention(q, kc, vc, rows, 80**-0.5, lib=portable)
    native = cpu_attention_kernels.paired_attention(q, kc, vc, rows, 80**-0.5)
    torch.testing.assert_close(got.float(), native.float(), atol=1e-2, rtol=1e-2)
