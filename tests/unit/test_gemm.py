"""The compiled bf16 matmul (csrc/gemm_bf16.c) against `F.linear`: batch sizes across register-block and L2-chunk
edges, output and input sizes off the tile (odd K too), bias, strided rows, its portable build against the native
one, and the packing round trip; `pack_weight` picks it for bf16 weights (oneDNN's layout when switched off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import cpu_gemm, cpu_packing


def _case(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    return x, w, b


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within a bf16 rounding step of the fp32 product (F.linear in bf16 rounds the same product once)."""
    want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(got, F.linear(x, w, bias), atol=2e-2, rtol=2**-7)


def test_the_kernel_builds_here() -> None:
    assert cpu_gemm.supports(torch.empty(2, 2, dtype=torch.bfloat16)), "a C compiler is on every machine we test on"


@pytest.mark.parametrize("m", [1, 3, 17, 32, 65, 300])
@pytest.mark.parametrize(("n", "k"), [(49, 40), (960, 576), (16, 2), (33, 41), (100, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(m, n, k, with_bias) -> None:
    x, w, b = _case(m, n, k)
    bias = b if with_bias else None
    _check(cpu_gemm.linear(x, cpu_gemm.pack(w), bias), x, w, bias)


def test_large_batch_spans_several_row_chunks() -> None:
    x, w, b = _case(700, 70, 1536)  # ~128 rows per L2 chunk at this K
    _check(cpu_gemm.linear(x, cpu_gemm.pack(w), b), x, w, b)


def test_strided_rows_and_leading_dims() -> None:
    x, w, b = _case(37, 49, 40)
    wide = torch.cat([x, torch.randn(37, 24).bfloat16()], dim=1)[:, :40]  # rows 64 apart
    assert wide.stride(0) == 64
    p = cpu_gemm.pack(w)
    _check(cpu_gemm.linear(wide, p, b), x, w, b)
    got = cpu_gemm.linear(x.reshape(1, 37, 40), p, b)
    assert got.shape == (1, 37, 49)
    _check(got[0], x, w, b)
    assert cpu_gemm.linear(x[:0], p).shape == (0, 49)


def test_pack_round_trip_and_refusals() -> None:
    _, w, _ = _case(1, 33, 41)
    p = cpu_gemm.pack(w)
    assert p.data.shape == (3, 21, 16, 2)
    assert torch.equal(cpu_gemm.unpack(p), w)
    with pytest.raises(ValueError):
        cpu_gemm.linear(torch.randn(2, 40).bfloat16(), p)  # wrong width
    with pytest.raises(ValueError):
        cpu_gemm.linear(torch.randn(2, 41), p)  # fp32 x
    assert not cpu_gemm.supports(torch.empty(2, 2))  # fp32 weights stay plain


def test_pack_weight_picks_the_kernel_or_onednn() -> None:
    x, w, b = _case(5, 49, 40)
    assert isinstance(cpu_packing.pack_weight(w), cpu_gemm.PackedWeight)
    onednn = cpu_packing.pack_weight(w, gemm_kernel=False)
    assert onednn is None or isinstance(onednn, torch.Tensor)
    for packed in (cpu_packing.pack_weight(w), onednn):
        if packed is not None:
            _check(cpu_packing.packed_linear(x, packed, b), x, w, b)


def test_the_default_gives_way_to_onednn_on_amx_cpus(monkeypatch) -> None:
    assert cpu_gemm.preferred(True) and not cpu_gemm.preferred(False)
    assert cpu_gemm.preferred(None) == (not cpu_gemm.amx_available())
    monkeypatch.setattr(cpu_gemm, "amx_available", lambda: True)
    assert not cpu_gemm.preferred(None) and cpu_gemm.preferred(True)
    monkeypatch.setattr(cpu_gemm, "amx_available", lambda: False)
    assert cpu_gemm.preferred(None)


@pytest.mark.slow
def test_portable_build_matches_the_native_one(portable_build) -> None:
    """csrc/gemm_bf16.c without avx512_bf16 (GCC vector extensions only) computes the same thing."""
    portable = cpu_gemm.bind_gemm(portable_build("gemm_bf16"))
    for m, n, k in [(1, 49, 40), (17, 100, 41), (300, 64, 96)]:
        x, w, b = _case(m, n, k, seed=m)
        p = cpu_gemm.pack(w)
        got = cpu_gemm.linear(x, p, b, lib=portable)
        _check(got, x, w, b)
        torch.testing.assert_close(got.float(), cpu_gemm.linear(x, p, b).float(), atol=1e-2, rtol=2**-7)
