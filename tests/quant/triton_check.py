"""The Triton int GEMM checked in a child process (test_triton.py), since Triton picks interpreter or compiler when
a kernel is decorated: `interpret` (run with TRITON_INTERPRET=1) holds the kernel on CPU tensors to its
dequantizing twin; `compile` builds every variant for sm_80 and sm_90 without a GPU. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from engine.quant import cpu_kernel, triton_kernel
from engine.quant.int_weight import IntWeight, quantize

SIGNATURE = {
    "x_ptr": "*{dt}", "codes_ptr": "*u8", "scales_ptr": "*fp16", "offsets_ptr": "*fp16", "bias_ptr": "*{dt}",
    "y_ptr": "*{dt}", "M": "i32", "N": "i32", "K": "i32", "G": "i32", "stride_xm": "i32", "stride_ym": "i32",
}  # fmt: skip
VARIANTS = [(4, 2), (4, 1), (8, 0)]  # (bits, offset kind: 2 zero points, 1 mins, 0 none)


def _weights() -> list[tuple[str, IntWeight]]:
    g = torch.Generator().manual_seed(0)
    zero = IntWeight(4, torch.randint(0, 16, (70, 128), generator=g, dtype=torch.uint8),
                     (torch.rand(70, 4, generator=g) * 0.05).half(), torch.randint(0, 16, (70, 4), generator=g).half(),
                     "zero", 32)  # fmt: skip
    mins = quantize(torch.randn(33, 256, generator=g), 4, 64)
    int8 = quantize(torch.randn(100, 128, generator=g), 8, 128)
    act = IntWeight(4, zero.codes, zero.scales, zero.offsets, "zero", 32, torch.randperm(128, generator=g))
    return [("int4-zero", zero), ("int4-min", mins), ("int8", int8), ("int4-act-order", act)]


def interpret() -> dict[str, float]:
    errors = {}
    for name, w in _weights():
        packed = cpu_kernel.pack(w)
        for rows in (1, 5, 40):
            for dtype in (torch.float32, torch.float16):
                x = torch.randn(rows, w.shape[1]).to(dtype)
                bias = torch.randn(w.shape[0]).to(dtype)
                got = triton_kernel.linear(x, packed, bias).float()
                want = F.linear(x.float(), w.dequantize().to(dtype).float(), bias.float())
                key = f"{name}-m{rows}-{str(dtype).removeprefix('torch.')}"
                errors[key] = float((got - want).abs().max() / want.abs().max())
    return errors


def compile_all() -> dict[str, int]:
    """Every variant the engine launches: bf16 / fp16 / fp32 models, each (bits, offset kind), GGUF's groups of 32
    and GPTQ's of 128, with and without bias (o_proj / down_proj have none; Qwen2's qkv has one)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sizes = {}
    for arch in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            for bits, offset in VARIANTS:
                for group, bias in ((128, True), (32, False)):
                    const = dict(BITS=bits, OFFSET=offset, GROUP=group, HAS_BIAS=bias, BLOCK_M=triton_kernel.BLOCK_M,
                                 BLOCK_N=triton_kernel.BLOCK_N, BLOCK_K=triton_kernel.BLOCK_K)  # fmt: skip
                    signature = {k: v.format(dt=dt) for k, v in SIGNATURE.items()} | dict.fromkeys(const, "constexpr")
                    src = ASTSource(triton_kernel._int_gemm_kernel, signature, const)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                    key = f"sm{arch}-{dt}-int{bits}-offset{offset}-g{group}-bias{int(bias)}"
                    sizes[key] = len(compiled.asm["cubin"])
    return sizes


if __name__ == "__main__":
    print(json.dumps(interpret() if sys.argv[1] == "interpret" else compile_all()))
