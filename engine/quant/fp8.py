"""FP8 weights: e4m3 values with one float32 scale per output (w = q * s). Read from checkpoints (`weight` +
`weight_scale`, per tensor or per channel; block-scaled `weight_scale_inv` is dequantized) or made at load
(dynamic per-channel). GPUs with FP8 (sm89+) multiply with `torch._scaled_mm`, activations scaled per row at run
time; the twin dequantizes and runs `F.linear`. `torch._scaled_mm`'s CUDA checks (aten/src/ATen/native/cuda/Blas.cpp)
are met once at load where they concern the weight (K and N padded to multiples of 16, the weight column-major) and
by a constant out dtype per call (bfloat16: the only one its sm89 row-wise kernel writes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
ALIGN = 16  # torch._scaled_mm on CUDA: mat1's K, mat2's K and N multiples of 16
OUT_DTYPE = torch.bfloat16  # row-wise scaling on sm89 (CUTLASS) writes bfloat16 only; bias must match it
PARTS = ("weight", "weight_scale")


@dataclass(frozen=True)
class Fp8Weight:
    q: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # [N] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> Fp8Weight:
        if start == 0 and length == self.q.shape[dim]:
            return self
        if dim == 0:
            return Fp8Weight(self.q.narrow(0, start, length), self.scale.narrow(0, start, length))
        return replace(self, q=self.q.narrow(1, start, length))

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.unsqueeze(1)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


def from_checkpoint(parts: dict[str, torch.Tensor], block: tuple[int, int] | None) -> Fp8Weight | torch.Tensor:
    """Per-tensor / per-channel scales stay FP8 (exactly); block scales come back dequantized (float32)."""
    q = parts["weight"]
    n, k = q.shape
    if "weight_scale_inv" in parts:  # [ceil(N / bn), ceil(K / bk)] block scales
        s = parts["weight_scale_inv"].float()
        bn, bk = block or (-(-n // s.shape[0]), -(-k // s.shape[1]))
        full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return q.float() * full
    s = parts["weight_scale"].float().reshape(-1)
    scale = s.expand(n).contiguous() if s.numel() == 1 else s
    return Fp8Weight(q.view(FP8) if q.dtype != FP8 else q, scale)


def quantize(w: torch.Tensor) -> Fp8Weight:
    """Dynamic per-channel: s = max |w_n| / 448."""
    w = w.float()
    scale = (w.abs().amax(1) / FP8_MAX).clamp_min(1e-12)
    return Fp8Weight((w / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


def concat(parts: list[Fp8Weight]) -> Fp8Weight:
    return Fp8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def pad_for_scaled_mm(w: Fp8Weight) -> Fp8Weight:
    """The weight as `scaled_mm` takes it: [N16, K16] contiguous (its transpose column-major), zero codes and unit
    scales in the padding. Done once, before the weight moves to the GPU."""
    n, k = w.shape
    pn, pk = -n % ALIGN, -k % ALIGN
    q = w.q.contiguous() if not (pn or pk) else torch.nn.functional.pad(w.q, (0, pk, 0, pn))
    scale = torch.cat([w.scale.float(), torch.ones(pn, device=w.scale.device)]) if pn else w.scale.float()
    return Fp8Weight(q, scale.contiguous())


def scaled_mm(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [..., K] -> [..., n] in x's dtype on a GPU with FP8: activations quantized per row, weights per column
    (row-wise scaling). `w`: from pad_for_scaled_mm ([N16, K16]); `n`: the real outputs."""
    x2 = x.reshape(-1, x.shape[-1])
    pad_k = w.q.shape[1] - x2.shape[1]
    if pad_k:  # zero inputs meet zero codes
        x2 = torch.nn.functional.pad(x2, (0, pad_k))
    xs = (x2.abs().amax(1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # [M, 1] float32, contiguous
    xq = (x2.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [M, K16] row-major
    fuse = bias is not None and n == w.q.shape[0]  # _scaled_mm's bias has N16 entries in OUT_DTYPE
    y = torch._scaled_mm(
        xq, w.q.t(), scale_a=xs, scale_b=w.scale.view(1, -1), bias=bias.to(OUT_DTYPE) if fuse else None,
        out_dtype=OUT_DTYPE,
    )  # fmt: skip
    if n != y.shape[1]:
        y = y[:, :n].contiguous()
    y = y.to(x.dtype)
    if bias is not None and not fuse:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)
