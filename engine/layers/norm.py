"""Norms: RMSNorm, computed in float32 as transformers does, with an optional fused residual add; Gemma's (1 + w)
RMSNorm; LayerNorm, also one per attention head.

With `fused` set (CPU, see cpu_fused_ops.py) the RMSNorm add and norm run as one compiled pass that updates the
residual in place; the torch code below is its twin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import cpu_fused_ops
from engine.weight_slice import Weight, materialize


class RMSNorm(nn.Module):
    fused: bool = False

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if self.fused:
            out, summed = cpu_fused_ops.add_rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, summed)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: scaled by (1 + weight), the product taken in float32 before casting back."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (as torch's nn.LayerNorm), with or without a bias."""

    def __init__(self, hidden_size: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class PerHeadLayerNorm(nn.Module):
    """A LayerNorm (no bias) of its own for each head of x [T, heads, head_dim] (StableLM's qk norm); a rank
    holds its heads' weights [heads, head_dim], loaded by global head index (`first_head` is this rank's first)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, first_head: int, total_heads: int) -> None:
        super().__init__()
        self.eps, self.first_head = eps, first_head
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.weight.shards = list(range(total_heads))  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Weight, head: int) -> None:
        local = head - self.first_head
        if 0 <= local < param.shape[0]:  # other ranks' heads are not held here
            param.data[local].copy_(materialize(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one layer_norm per head with its own weight, as transformers computes it (bit for bit)
        return torch.stack(
            [F.layer_norm(x[:, h], x.shape[-1:], self.weight[h], None, self.eps) for h in range(x.shape[1])], dim=1
        )
