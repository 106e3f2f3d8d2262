"""Gated activation: silu(gate) * up over the packed gate_up projection output."""

from __future__ import annotations

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
