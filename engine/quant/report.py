"""What quantization did to a loaded model: weight bytes in the serving dtype against bytes as held, for the start-up
log line and the benchmark; and the tensor-parallel check that no rank's slice of inputs splits a group.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.parallel_config import ParallelConfigError, model_shape
from engine.quant.config import QuantConfig


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes every weight would take in `dtype`, bytes held now): quantized matmuls at their packed size, tied
    weights once."""
    dense = held = 0
    seen: set[int] = set()
    for module in model.modules():
        qm = getattr(module, "qmatmul", None)
        if qm is not None:  # a quantized head tied to a 16-bit embedding: its dense bytes are the embedding's
            dense += 0 if getattr(module, "shares_dense_weight", False) else qm.n * qm.k * dtype.itemsize
            held += qm.nbytes
        for p in module.parameters(recurse=False):
            if id(p) in seen or p.numel() == 0:
                continue
            seen.add(id(p))
            dense += p.numel() * dtype.itemsize
            held += p.numel() * p.element_size()
        packed = getattr(module, "packed", None)
        if packed is not None and getattr(module, "weight", None) is not None and module.weight.numel() == 0:
            n = packed.data.numel() * packed.data.element_size() if hasattr(packed, "data") else 0
            dense, held = dense + n, held + n  # a 16-bit weight now held packed for the CPU GEMM
    return dense, held


def check_groups_divide(quant: QuantConfig | None, hf_config, degree: int) -> None:
    """Row-parallel layers split their inputs across ranks on group boundaries only (start-up error otherwise)."""
    if quant is None or degree == 1 or quant.method not in ("gptq", "awq", "gguf"):
        return
    if quant.desc_act:
        raise ParallelConfigError(
            f"tensor-parallel degree {degree} cannot split an act-order (desc_act) GPTQ checkpoint's inputs; "
            "serve it on one rank"
        )
    g = quant.group_size
    if g == -1:
        return
    heads, _, intermediate = model_shape(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    inputs = {"attention output": heads * head_dim, "MLP down": intermediate}
    for what, k in inputs.items():
        if k % degree or (k // degree) % g:
            works = [d for d in range(1, heads + 1) if all(i % d == 0 and (i // d) % g == 0 for i in inputs.values())]
            raise ParallelConfigError(
                f"tensor-parallel degree {degree} splits the {quant.method} groups of {g} inputs ({what} projection: "
                f"{k} inputs / {degree} ranks); degrees that work: {', '.join(map(str, works))}"
            )
