"""AWQ checkpoints (AutoAWQ GEMM layout) onto IntWeight, and back (tests write checkpoints):

    qweight int32 [K, N/8]  eight 4-bit codes per word along the outputs, in AWQ's interleaved order: nibble i of
                            word c holds output 8c + ORDER[i], ORDER = 0, 2, 4, 6, 1, 3, 5, 7
    qzeros  int32 [G, N/8]  zero points, packed the same way
    scales  fp16  [G, N]

w[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n].
"""

from __future__ import annotations

import torch

from engine.quant.gptq import pack_along_last, unpack_along_last
from engine.quant.int_weight import IntWeight

PARTS = ("qweight", "qzeros", "scales")
OPTIONAL: tuple[str, ...] = ()
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i -> output within the word
INVERSE = torch.argsort(ORDER)  # output j -> nibble


def unpack_outputs(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> uint8 [R, N] in output order."""
    nibbles = unpack_along_last(packed).view(packed.shape[0], -1, 8)  # [R, N/8, nibble]
    return nibbles[:, :, INVERSE].reshape(packed.shape[0], -1)


def pack_outputs(codes: torch.Tensor) -> torch.Tensor:
    grouped = codes.view(codes.shape[0], -1, 8)[:, :, ORDER]
    return pack_along_last(grouped.reshape(codes.shape[0], -1))


def to_int_weight(parts: dict[str, torch.Tensor], group_size: int) -> IntWeight:
    qweight, qzeros, scales = (parts[p] for p in PARTS)
    codes = unpack_outputs(qweight).t().contiguous()  # [N, K]
    n, k = codes.shape
    zeros = unpack_outputs(qzeros)[:, :n]  # [G, N]
    g = k if group_size == -1 else group_size
    return IntWeight(4, codes, scales.half().t().contiguous(), zeros.half().t().contiguous(), "zero", g)


def from_int_weight(w: IntWeight) -> dict[str, torch.Tensor]:
    if w.offset_kind != "zero" or w.perm is not None:
        raise ValueError("AWQ stores zero points, inputs in order")
    return {
        "qweight": pack_outputs(w.codes.t().contiguous()),
        "qzeros": pack_outputs(w.offsets.float().t().to(torch.uint8).contiguous()),
        "scales": w.scales.t().contiguous(),
    }
