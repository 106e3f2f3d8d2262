"""Triton dequantize-GEMM for int4 / int8 weights on GPUs: y[M, N] = x[M, K] @ W^T (+ bias), reading the packed
weight in the CPU kernel's panels (engine/quant/cpu_kernel.py: 16 outputs per panel; int4 quads of pair steps as 32
uint16, int8 pair steps of 32 bytes; fp16 scales and offsets [panel, group, 16]). Each program dequantizes a [BLOCK_K,
BLOCK_N] tile (w = (q - z) * s, q * s + m or q * s, per input's group) in float32 and multiplies it in x's dtype
with float32 accumulation. GPTQ act-order inputs are gathered into group order first (PackedInt.perm). Tests run it
in Triton's interpreter on CPU tensors and compile it for sm_80 / sm_90 without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32


@triton.jit
def _int_gemm_kernel(
    x_ptr, codes_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr, M, N, K, G, stride_xm, stride_ym,
    BITS: tl.constexpr, OFFSET: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    panel, lane = rn // 16, rn % 16
    row = rm.to(tl.int64)  # M * K and M * N pass 2**31 in long prefill steps of wide layers
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + row[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0
        )
        wmask = (rk[:, None] < K) & (rn[None, :] < N)
        element = 2 * lane[None, :] + (rk[:, None] % 2)  # [BLOCK_K, BLOCK_N]
        if BITS == 4:  # uint16 [quad][element]: step j of the quad in bits 4j..4j+3 (little-endian bytes)
            j = (rk[:, None] // 2) % 4
            addr = panel[None, :].to(tl.int64) * (K * 8) + (rk[:, None] // 8) * 64 + 2 * element + j // 2
            byte = tl.load(codes_ptr + addr, mask=wmask, other=0).to(tl.int32)
            q = ((byte >> ((j % 2) * 4)) & 15).to(tl.float32)
        else:
            addr = panel[None, :].to(tl.int64) * (K * 16) + (rk[:, None] // 2) * 32 + element
            q = tl.load(codes_ptr.to(tl.pointer_type(tl.int8)) + addr, mask=wmask, other=0).to(tl.float32)
        at = (panel[None, :] * G + rk[:, None] // GROUP) * 16 + lane[None, :]
        s = tl.load(scales_ptr + at, mask=wmask, other=0.0).to(tl.float32)
        if OFFSET == 2:  # zero points
            w = (q - tl.load(offsets_ptr + at, mask=wmask, other=0.0).to(tl.float32)) * s
        elif OFFSET == 1:  # mins
            w = q * s + tl.load(offsets_ptr + at, mask=wmask, other=0.0).to(tl.float32)
        else:
            w = q * s
        acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip


def linear(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype; `packed`: engine.quant.cpu_kernel.PackedInt."""
    from engine.quant.int_weight import OFFSET_KINDS

    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.k)
    if packed.perm is not None:
        x2 = x2.index_select(1, packed.perm)
    x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, packed.n), dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(packed.n, BLOCK_N))
        offsets = packed.offsets if packed.offsets is not None else packed.scales
        _int_gemm_kernel[grid](
            x2, packed.codes, packed.scales, offsets, bias if bias is not None else y, y, m, packed.n, packed.k,
            packed.k // packed.group_size, x2.stride(0), y.stride(0), BITS=packed.bits,
            OFFSET=OFFSET_KINDS.index(packed.offset_kind), GROUP=packed.group_size, HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip
    return y.reshape(*lead, packed.n)
