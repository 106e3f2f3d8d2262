"""The canonical integer weight every 4/8-bit format is mapped onto (GPTQ, AWQ, GGUF Q4_0/Q4_1/Q8_0, int4/int8 made
at load): codes [N, K] with one fp16 scale per (output, group of `group_size` inputs) and, for int4, one fp16 offset:

    mins:        w = q * s + m           (GGUF Q4_1, int4 made at load)
    zero points: w = (q - z) * s         (GPTQ, AWQ, GGUF Q4_0 with z = 8; z an integer, so z * s is exact)

Dequantization computes exactly these float32 expressions, so GGUF files dequantize bit for bit as `gguf` does.
Like a tensor it has `.shape`, `.dim()` and `.narrow()` (inputs only on group boundaries): the linear layers'
tensor-parallel loaders slice it as they slice a plain weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

OFFSET_KINDS = ("none", "min", "zero")


@dataclass(frozen=True)
class IntWeight:
    bits: int  # 4: codes 0..15 (uint8); 8: codes -128..127 (int8)
    codes: torch.Tensor  # [N, K] one code per weight, inputs in storage order (see perm)
    scales: torch.Tensor  # [N, G] float16, G = K / group_size
    offsets: torch.Tensor | None  # [N, G] float16 mins, or zero points (integers as float16); None: symmetric
    offset_kind: str  # "none" | "min" | "zero"
    group_size: int
    perm: torch.Tensor | None = None  # [K] int64: codes[:, j] belongs to input perm[j] (GPTQ act-order); None = j

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if k % self.group_size or self.scales.shape != (n, k // self.group_size):
            raise ValueError(
                f"scales {tuple(self.scales.shape)} do not fit codes {(n, k)} in groups of {self.group_size}"
            )
        if (self.offsets is None) != (self.offset_kind == "none"):
            raise ValueError(f"offsets do not match offset kind {self.offset_kind!r}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dim(self) -> int:
        return 2

    @property
    def num_groups(self) -> int:
        return self.codes.shape[1] // self.group_size

    def narrow(self, dim: int, start: int, length: int) -> IntWeight:
        """Outputs (dim 0) anywhere; inputs (dim 1) on group boundaries only."""
        if dim == 0:
            cut = {"codes": self.codes.narrow(0, start, length), "scales": self.scales.narrow(0, start, length)}
            if self.offsets is not None:
                cut["offsets"] = self.offsets.narrow(0, start, length)
            return replace(self, **cut)
        if start == 0 and length == self.codes.shape[1]:
            return self
        if self.perm is not None:
            raise ValueError("an act-order (g_idx) weight is split along its inputs only after reordering")
        g = self.group_size
        if start % g or length % g:
            raise ValueError(f"inputs [{start}, {start + length}) do not fall on groups of {g}")
        gs = slice(start // g, (start + length) // g)
        return replace(
            self,
            codes=self.codes[:, start : start + length],
            scales=self.scales[:, gs],
            offsets=None if self.offsets is None else self.offsets[:, gs],
        )

    def effective_mins(self) -> torch.Tensor | None:
        """[N, G] float32 m of w = q * s + m (zero points: -(z * s), exact in float32)."""
        if self.offsets is None:
            return None
        if self.offset_kind == "min":
            return self.offsets.float()
        return -(self.offsets.float() * self.scales.float())

    def dequantize_stored(self) -> torch.Tensor:
        """[N, K] float32 in storage order (perm not undone)."""
        n, k = self.codes.shape
        q = self.codes.float().view(n, self.num_groups, self.group_size)
        s = self.scales.float().unsqueeze(-1)
        if self.offset_kind == "zero":  # as GPTQ, AWQ and GGUF Q4_0 compute it (signed zeros included)
            return ((q - self.offsets.float().unsqueeze(-1)) * s).view(n, k)
        w = q * s
        if self.offset_kind == "min":
            w = w + self.offsets.float().unsqueeze(-1)
        return w.view(n, k)

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 weight, inputs in their original order."""
        w = self.dequantize_stored()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    @property
    def nbytes(self) -> int:
        """Bytes as stored on the device: codes packed to `bits`, fp16 scales and offsets."""
        n, k = self.codes.shape
        extra = 0 if self.perm is None else k * 8
        return n * k * self.bits // 8 + self.scales.numel() * 2 * (1 if self.offsets is None else 2) + extra


def concat_outputs(parts: list[IntWeight]) -> IntWeight:
    """Stack weights along outputs (q, k, v or gate, up into one matmul): same format, same input order."""
    first = parts[0]
    for p in parts[1:]:
        same = (p.bits, p.offset_kind, p.group_size) == (first.bits, first.offset_kind, first.group_size)
        if not same or p.codes.shape[1] != first.codes.shape[1]:
            raise ValueError("parts of one matmul are quantized differently")
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError("parts of one matmul have different act-order permutations")
    return replace(
        first,
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        offsets=None if first.offsets is None else torch.cat([p.offsets for p in parts]),
    )


def default_group_size(k: int, preferred: int = 128) -> int:
    """`preferred` where it divides the input size, else the largest of 64 and 32 that does (else k itself)."""
    for g in (preferred, 64, 32):
        if g <= k and k % g == 0:
            return g
    return k


def quantize(w: torch.Tensor, bits: int, group_size: int) -> IntWeight:
    """Round-to-nearest at load: int4 asymmetric (scale and min per group), int8 symmetric (scale per group)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input size {k} is not a multiple of the group size {group_size}")
    x = w.float().view(n, k // group_size, group_size)
    if bits == 8:
        scale = (x.abs().amax(-1) / 127).clamp_min(1e-8).half()
        q = torch.round(x / scale.float().unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
        return IntWeight(8, q.view(n, k), scale, None, "none", group_size)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    mins = lo.half()
    q = torch.round((x - mins.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return IntWeight(4, q.view(n, k), scale, mins, "min", group_size)
