"""oneDNN weight packing for CPU matmuls in 16-bit: the weight is laid out once in the blocked
format the AMX/AVX-512 kernels read, which halves decode time against `F.linear` on a plain weight.
"""

from __future__ import annotations

import torch


def pack_weight(w: torch.Tensor) -> torch.Tensor | None:
    """A packed copy of `w` [out, in], or None where packing does not apply (GPU, fp32, no oneDNN)."""
    if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16) or w.numel() == 0:
        return None
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ W^T (+ bias) -> [T, out] with a weight from `pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
