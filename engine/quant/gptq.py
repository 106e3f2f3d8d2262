"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout) onto IntWeight, and back (tests write checkpoints):

    qweight int32 [K/8, N]  eight 4-bit codes per word along the inputs, input 8i + j in bits 4j..4j+3
    qzeros  int32 [G, N/8]  zero points packed the same way along the outputs (v1 format: stored minus one)
    scales  fp16  [G, N]
    g_idx   int32 [K]       the group of each input; act-order (desc_act) checkpoints do not follow k // group

w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]. Act-order inputs are stored sorted by group (IntWeight.perm).
"""

from __future__ import annotations

import torch

from engine.quant.int_weight import IntWeight

PARTS = ("qweight", "qzeros", "scales")
OPTIONAL = ("g_idx",)
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_along_last(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., X/8] -> uint8 [..., X]: nibble j of word i is element 8i + j."""
    codes = (packed.to(torch.int32).unsqueeze(-1) >> SHIFTS) & 15
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 8).to(torch.uint8)


def pack_along_last(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., X] (0..15) -> int32 [..., X/8], the inverse of unpack_along_last."""
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], codes.shape[-1] // 8, 8)
    words = (c << SHIFTS.to(torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def to_int_weight(parts: dict[str, torch.Tensor], group_size: int, zero_offset: int) -> IntWeight:
    qweight, qzeros, scales = (parts[p] for p in PARTS)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    codes = unpack_along_last(qweight.t().contiguous())  # [N, K]
    zeros = unpack_along_last(qzeros)[:, :n].to(torch.int16) + zero_offset  # [G, N]
    g = k if group_size == -1 else group_size
    g_idx = parts.get("g_idx")
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g):
        perm = torch.argsort(g_idx.long(), stable=True)
        codes = codes[:, perm]
        if not torch.equal(g_idx.long()[perm], torch.arange(k) // g):
            raise ValueError(f"g_idx does not give every group {g} inputs")
    return IntWeight(4, codes.contiguous(), scales.half().t().contiguous(), zeros.half().t().contiguous(), "zero", g,
                     perm)  # fmt: skip


def from_int_weight(w: IntWeight, zero_offset: int = 1, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a zero-point int4 weight (inputs in original order; `g_idx` to write act-order)."""
    if w.offset_kind != "zero":
        raise ValueError("GPTQ stores zero points")
    k = w.shape[1]
    codes = w.codes if w.perm is None else torch.empty_like(w.codes).index_copy_(1, w.perm, w.codes)
    return {
        "qweight": pack_along_last(codes).t().contiguous(),  # [N, K/8] -> [K/8, N]
        "qzeros": pack_along_last((w.offsets.float().t() - zero_offset).to(torch.int32) & 15),
        "scales": w.scales.t().contiguous(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // w.group_size) if g_idx is None else g_idx.to(torch.int32),
    }
