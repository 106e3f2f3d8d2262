"""Activations: the gated silu(gate) * up over a packed gate_up output (compiled on CPU), any gated act(gate) * up
(GeGLU), and the plain activations by their config names (transformers' own functions, so outputs match)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import cpu_fused_ops


class SiluAndMul(nn.Module):
    fused: bool = False  # CPU: one compiled pass (cpu_fused_ops.py); the torch code is its twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, 2 * I] -> [T, I]."""
        if self.fused:
            return cpu_fused_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ActAndMul(nn.Module):
    """act(gate) * up over a packed [T, 2 * I] gate_up output -> [T, I] (GeGLU with a gelu)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.act = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU with its own rounded constant."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """An activation by its config name ('gelu', 'gelu_pytorch_tanh', 'gelu_new', 'relu', 'silu', ...)."""
    if name == "bloom_gelu":
        return bloom_gelu
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"activation {name!r} in the model config is not supported")
    return ACT2FN[name]
