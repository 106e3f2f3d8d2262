"""Checkpoint formats onto IntWeight and the packed layouts, against references written here from each format's
documented layout (bit operations, not our unpackers) and against `gguf.dequantize` bit for bit; the CPU kernel
against its dequantizing twin.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, dequantize, quantize

from engine.quant import awq, cpu_kernel, fp8, gptq
from engine.quant import gguf as gguf_quant
from engine.quant.int_weight import IntWeight, concat_outputs, default_group_size
from engine.quant.int_weight import quantize as rtn


def _random_zero_point(n: int, k: int, group: int, seed: int) -> IntWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 16, (n, k // group), generator=g).half()
    scales = (torch.rand(n, k // group, generator=g) * 0.1 + 0.01).half()
    return IntWeight(4, codes, scales, zeros, "zero", group)


def test_gptq_layout_read_as_documented() -> None:
    w = _random_zero_point(24, 64, 32, seed=1)
    parts = gptq.from_int_weight(w, zero_offset=1)
    qweight, qzeros = (parts[p].numpy().view(np.uint32) for p in ("qweight", "qzeros"))
    scales = parts["scales"].float().numpy()
    ref = np.empty((24, 64), dtype=np.float32)
    for k in range(64):
        for n in range(24):
            q = (int(qweight[k // 8, n]) >> (4 * (k % 8))) & 0xF
            z = ((int(qzeros[k // 32, n // 8]) >> (4 * (n % 8))) & 0xF) + 1  # v1: stored minus one
            ref[n, k] = (q - z) * scales[k // 32, n]
    back = gptq.to_int_weight(parts, group_size=32, zero_offset=1)
    assert np.array_equal(back.dequantize().numpy(), ref)


def test_awq_layout_read_as_documented() -> None:
    w = _random_zero_point(16, 64, 32, seed=2)
    parts = awq.from_int_weight(w)
    qweight, qzeros = (parts[p].numpy().view(np.uint32) for p in ("qweight", "qzeros"))
    scales = parts["scales"].float().numpy()
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ: nibble i of a word holds output 8c + order[i]
    ref = np.empty((16, 64), dtype=np.float32)
    for k in range(64):
        for c in range(2):
            for i in range(8):
                n = 8 * c + order[i]
                q = (int(qweight[k, c]) >> (4 * i)) & 0xF
                z = (int(qzeros[k // 32, c]) >> (4 * i)) & 0xF
                ref[n, k] = (q - z) * scales[k // 32, n]
    assert np.array_equal(awq.to_int_weight(parts, group_size=32).dequantize().numpy(), ref)


def test_gptq_act_order_uses_g_idx() -> None:
    w = _random_zero_point(16, 64, 32, seed=3)
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)) // 32  # each group gets 32 inputs
    parts = gptq.from_int_weight(w, zero_offset=1, g_idx=g_idx)
    back = gptq.to_int_weight(parts, group_size=32, zero_offset=1)
    q = gptq.unpack_along_last(parts["qweight"].t().contiguous()).float()  # [N, K] in input order
    z = gptq.unpack_along_last(parts["qzeros"]).float() + 1  # [G, N]
    ref = (q - z.t()[:, g_idx]) * parts["scales"].float().t()[:, g_idx]
    assert back.perm is not None and torch.equal(back.dequantize(), ref)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_types_map_bit_for_bit(type_name: str) -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((40, 96)) * rng.uniform(0.01, 3, (40, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block
    qtype = GGMLQuantizationType[type_name]
    data = quantize(w, qtype)
    ref = dequantize(data, qtype).reshape(40, 96)
    iw = gguf_quant.to_int_weight(data, type_name, 40, 96)
    assert iw.bits == (8 if type_name == "Q8_0" else 4) and iw.group_size == 32
    assert np.array_equal(iw.dequantize().numpy().view(np.uint32), ref.view(np.uint32))
    # the kernel's packed layout keeps every value: unpacked, it dequantizes to the same bits
    repacked = cpu_kernel.unpack(cpu_kernel.pack(iw))
    assert np.array_equal(repacked.dequantize().numpy().view(np.uint32), ref.view(np.uint32))


def test_gguf_rows_permute_with_their_scales() -> None:
    data = quantize(np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32), GGMLQuantizationType.Q4_1)
    iw = gguf_quant.to_int_weight(data, "Q4_1", 8, 32)
    order = np.array([0, 2, 1, 3, 4, 6, 5, 7])
    assert torch.equal(gguf_quant.permute_rows(iw, order).dequantize(), iw.dequantize()[order])


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_error_is_within_half_a_step(bits: int) -> None:
    w = torch.randn(32, 256)
    iw = rtn(w, bits, 128)
    step = iw.scales.float().repeat_interleave(128, 1)
    assert ((iw.dequantize() - w).abs() <= 0.5 * step + 2e-3 * w.abs() + 1e-6).all()
    dense = 32 * 256 * 2
    assert iw.nbytes < (0.3 if bits == 4 else 0.55) * dense


def test_default_group_size_divides() -> None:
    assert [default_group_size(k) for k in (4096, 576, 64, 96, 40)] == [128, 64, 64, 32, 40]


def test_narrow_on_group_boundaries_only() -> None:
    w = rtn(torch.randn(16, 128), 4, 32)
    assert torch.equal(w.narrow(1, 64, 64).dequantize(), w.dequantize()[:, 64:])
    assert torch.equal(w.narrow(0, 3, 5).dequantize(), w.dequantize()[3:8])
    with pytest.raises(ValueError, match="groups of 32"):
        w.narrow(1, 16, 64)
    both = concat_outputs([w.narrow(0, 0, 8), w.narrow(0, 8, 8)])
    assert torch.equal(both.dequantize(), w.dequantize())


def _with_kinds() -> list[IntWeight]:
    torch.manual_seed(0)
    out = [rtn(torch.randn(37, 128), 4, 32), rtn(torch.randn(70, 256), 8, 128), _random_zero_point(33, 64, 64, 4)]
    q8 = quantize(np.random.default_rng(2).standard_normal((20, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    out.append(gguf_quant.to_int_weight(q8, "Q8_0", 20, 64))
    perm = torch.randperm(128)
    base = rtn(torch.randn(24, 128), 4, 32)
    out.append(IntWeight(4, base.codes, base.scales, base.offsets, "min", 32, perm))
    # int8 wide enough for the single-row blocks of 6-8 panels (300 outputs = 19 panels), and int8 with mins
    out.append(rtn(torch.randn(300, 384), 8, 128))
    b8 = rtn(torch.randn(40, 128), 8, 32)
    out.append(IntWeight(8, b8.codes, b8.scales, (torch.randn(b8.scales.shape) * 0.01).half(), "min", 32))
    return out


AMX = [False, pytest.param(True, marks=pytest.mark.skipif(not cpu_kernel.amx_available(), reason="no AMX tiles"))]


@pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler")
@pytest.mark.parametrize("amx", AMX)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16, 33])
def test_cpu_kernel_matches_its_twin(rows: int, amx: bool) -> None:
    """The kernel multiplies by the exact dequantized weights (bf16 x, float32 sums): the twin's float32 product of
    the same bf16 x, to the output's bf16 rounding. With `amx`, int4 from 3 rows runs on AMX tiles."""
    for w in _with_kinds():
        packed = dataclasses.replace(cpu_kernel.pack(w), amx=amx)
        x = torch.randn(rows, w.shape[1]).bfloat16()
        bias = torch.randn(w.shape[0]).bfloat16()
        got = cpu_kernel.linear(x, packed, bias).float()
        want = F.linear(x.float(), w.dequantize(), bias.float())
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item() / 8, rtol=8e-3)


@pytest.mark.skipif(not cpu_kernel.amx_available(), reason="no AMX tiles")
def test_amx_tiles_leave_one_and_two_rows_and_int8_to_avx512() -> None:
    """The tiles take int4 from 3 rows; fewer rows, and int8 at any count, run the AVX-512 kernel."""
    packed = {bits: cpu_kernel.pack(rtn(torch.randn(48, 64), bits, 32)) for bits in (4, 8)}
    before = cpu_kernel.amx_calls()
    for bits, rows in ((4, 1), (4, 2), (8, 3), (8, 16)):
        cpu_kernel.linear(torch.randn(rows, 64).bfloat16(), dataclasses.replace(packed[bits], amx=True))
    assert cpu_kernel.amx_calls() == before
    cpu_kernel.linear(torch.randn(3, 64).bfloat16(), dataclasses.replace(packed[4], amx=True))
    assert cpu_kernel.amx_calls() == before + 1


@pytest.mark.skipif(not cpu_kernel.amx_available(), reason="no AMX tiles")
@pytest.mark.parametrize("rows", [3, 16, 17, 40])
def test_amx_tiles_agree_with_the_avx512_kernel(rows: int) -> None:
    """int4 on AMX tiles against the AVX-512 kernel on the same packed weight (groups of 32, 64, 128; panels left
    over from blocks of four; partial last panels; rows beyond one tile, a partial last one zero-padded, decoded tiles
    reused or (wide K) decoded again; strided rows): the same float32 sums up to their order."""
    torch.manual_seed(1)
    # 4160 inputs: past DEC_MAX (csrc/gemm_q_amx.h), so later row blocks decode again instead of reusing tiles
    for n, k, group in ((37, 128, 32), (200, 192, 64), (96, 384, 128), (40, 4160, 64)):
        packed = cpu_kernel.pack(rtn(torch.randn(n, k), 4, group))
        x = torch.randn(rows, k + 40).bfloat16()[:, 8 : 8 + k]  # rows k + 40 apart: the tile loads take x's stride
        before = cpu_kernel.amx_calls()
        tiles = cpu_kernel.linear(x, dataclasses.replace(packed, amx=True)).float()
        assert cpu_kernel.amx_calls() == before + 1
        avx = cpu_kernel.linear(x.contiguous(), packed).float()
        assert cpu_kernel.amx_calls() == before + 1
        torch.testing.assert_close(tiles, avx, atol=1e-2 * avx.abs().max().item() / 8, rtol=8e-3)


def test_fp8_scales_per_tensor_channel_and_block() -> None:
    w = torch.randn(32, 64)
    f = fp8.quantize(w)
    assert torch.allclose(f.dequantize(), w, rtol=0.07, atol=1e-3)
    per_tensor = fp8.from_checkpoint({"weight": f.q, "weight_scale": torch.tensor(0.5)}, None)
    assert torch.equal(per_tensor.dequantize(), f.q.float() * 0.5)
    blocks = torch.rand(2, 4) + 0.5
    dense = fp8.from_checkpoint({"weight": f.q, "weight_scale_inv": blocks}, (16, 16))
    assert torch.equal(dense, f.q.float() * blocks.repeat_interleave(16, 0).repeat_interleave(16, 1))


@pytest.mark.slow
def test_portable_build_matches_the_native_one(portable_build) -> None:
    """csrc/gemm_q.c without AVX-512 (GCC vector extensions, x86-64-v2): the same results as the native build."""
    lib = cpu_kernel.bind_gemm_q(portable_build("gemm_q"))
    for w in _with_kinds():
        packed = cpu_kernel.pack(w)
        for rows in (1, 5):
            x = torch.randn(rows, w.shape[1]).bfloat16()
            bias = torch.randn(w.shape[0]).bfloat16()
            got = cpu_kernel.linear(x, packed, bias, lib=lib).float()
            want = F.linear(x.float(), w.dequantize(), bias.float())
            torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item() / 8, rtol=8e-3)
            if cpu_kernel.available():
                native = cpu_kernel.linear(x, packed, bias).float()
                torch.testing.assert_close(got, native, atol=2e-2 * want.abs().max().item() / 8, rtol=8e-3)
