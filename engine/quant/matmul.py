"""The matmul a quantized linear layer runs, chosen once by the plan (engine/plan.py: resolve_quant_kernel):

    int formats (int4 / int8 / GPTQ / AWQ / GGUF): "cpu_kernel" (csrc/gemm_q.c), "cpu_amx" (the same, int4 on AMX
        tiles), "triton" (GPUs), or "twin"
    bitsandbytes modes: "bitsandbytes", or "twin"
    fp8: "scaled_mm" (GPUs with FP8), or "twin"

Every object holds the packed weight as plain tensor attributes (counted by the benchmark's weight bytes) and has
a `twin` method: dequantize, then `F.linear`. Tests hold each kernel to its twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant import bnb, cpu_kernel, fp8
from engine.quant.int_weight import IntWeight


class QuantMatmul(nn.Module):
    kernel: str
    n: int
    k: int

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def twin(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class IntMatmul(QuantMatmul):
    def __init__(self, w: IntWeight, kernel: str, device: torch.device) -> None:
        super().__init__()
        self.kernel, (self.n, self.k) = kernel, w.shape
        self.bits, self.group_size = w.bits, w.group_size
        p = cpu_kernel.pack(w)  # one layout for every kernel: the CPU's panels (the Triton kernel reads them too)
        self.packed = cpu_kernel.PackedInt(
            p.codes.to(device), p.scales.to(device), None if p.offsets is None else p.offsets.to(device), p.bits,
            p.offset_kind, p.group_size, p.n, p.k, None if p.perm is None else p.perm.to(device), kernel == "cpu_amx",
        )  # fmt: skip
        self.codes, self.scales, self.offsets, self.perm = (
            self.packed.codes,
            self.packed.scales,
            self.packed.offsets,
            self.packed.perm,
        )  # tensor attributes, as the benchmark counts weight bytes

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel in cpu_kernel.KERNELS:
            return cpu_kernel.linear(x, self.packed, bias)
        if self.kernel == "triton":
            from engine.quant import triton_kernel

            return triton_kernel.linear(x, self.packed, bias)
        return self.twin(x, bias)

    def int_weight(self) -> IntWeight:
        return cpu_kernel.unpack(self.packed)

    def dequantize(self) -> torch.Tensor:
        return self.int_weight().dequantize()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


class BnbMatmul(QuantMatmul):
    def __init__(self, w: bnb.BnbWeight, kernel: str) -> None:
        super().__init__()
        self.kernel, self.n, self.k, self.w = kernel, w.n, w.k, w
        self.data = w.data

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return bnb.matmul(x, self.w, bias) if self.kernel == "bitsandbytes" else self.twin(x, bias)

    def dequantize(self) -> torch.Tensor:
        return bnb.dequantize(self.w)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


class Fp8Matmul(QuantMatmul):
    def __init__(self, w: fp8.Fp8Weight, kernel: str, device: torch.device) -> None:
        super().__init__()
        self.kernel, (self.n, self.k) = kernel, w.shape
        w = fp8.pad_for_scaled_mm(w) if kernel == "scaled_mm" else w  # padded on the CPU, once
        self.w = fp8.Fp8Weight(w.q.to(device), w.scale.to(device))
        self.q, self.scale = self.w.q, self.w.scale

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8.scaled_mm(x, self.w, bias, self.n) if self.kernel == "scaled_mm" else self.twin(x, bias)

    def dequantize(self) -> torch.Tensor:
        return self.w.dequantize()[: self.n, : self.k]

    @property
    def nbytes(self) -> int:
        return self.w.nbytes
