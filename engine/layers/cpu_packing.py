"""Weight packing for CPU matmuls in 16-bit, done once after loading; the plain weight is then dropped.

bfloat16 weights go to the compiled kernel's layout (cpu_gemm.py, csrc/gemm_bf16.c: input pairs interleaved for
vdpbf16ps, the weight stream prefetched), which beats oneDNN's packed matmul at every batch size measured here
(1.4-1.5x at decode sizes, par at prefill). float16 weights, bfloat16 ones where no C compiler builds the kernel,
and every weight when the kernel is switched off (`EngineConfig(cpu_gemm=False)`) go to oneDNN's blocked format
instead (about half the decode time of `F.linear` on a plain weight). GPU and float32 weights are not packed.
"""

from __future__ import annotations

import torch

from engine.layers import cpu_gemm


def pack_weight(w: torch.Tensor, gemm_kernel: bool = True) -> torch.Tensor | cpu_gemm.PackedWeight | None:
    """A packed copy of `w` [out, in], or None where packing does not apply (GPU, fp32, no oneDNN).
    `gemm_kernel`: bfloat16 weights may take the compiled kernel's layout (else oneDNN's)."""
    if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16) or w.numel() == 0:
        return None
    if gemm_kernel and cpu_gemm.supports(w):
        return cpu_gemm.pack(w)
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor | cpu_gemm.PackedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, in] @ W^T (+ bias) -> [T, out] with a weight from `pack_weight`."""
    if isinstance(packed, cpu_gemm.PackedWeight):
        if x.dtype != torch.bfloat16:
            return cpu_gemm.linear(x.to(torch.bfloat16), packed, bias).to(x.dtype)
        return cpu_gemm.linear(x, packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
