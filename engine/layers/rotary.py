"""Rotary position embedding with a precomputed cos/sin table; any rope type transformers knows.

The inverse frequencies come from transformers' own rope functions (llama3, linear, yarn, ...), so
scaled-rope checkpoints match the reference. Tables are float32 and indexed by absolute position.
A `StepRotary` holds one step's positions and rotates each layer's q and k heads (in place, compiled, on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers import cpu_fused_ops


def _inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' (position-dependent NTK scaling) is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r} in the model config")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    fused: bool = False  # CPU: rotate in place with the compiled op (cpu_fused_ops.py)

    def __init__(self, hf_config, head_dim: int, max_position: int) -> None:
        super().__init__()
        target = torch.empty(0).device  # the device the model is built on (`with device:`), meta included
        with torch.device("cpu"):  # transformers' rope functions and the table: on the CPU, whatever the target
            inv_freq, scaling = _inv_freq(hf_config, head_dim)
            freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
            cos, sin = emb.cos() * scaling, emb.sin() * scaling
            # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated): fewer ops per layer.
            half = head_dim // 2
            sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.register_buffer("cos", cos.to(target), persistent=False)
        self.register_buffer("sin_signed", sin_signed.to(target), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions [T] -> each [T, 1, D] (computed once per step)."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin_signed[positions].to(dtype).unsqueeze(1)

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> StepRotary:
        return StepRotary(self, positions, dtype)


class StepRotary:
    """The rotation of one step's positions [T], shared by every layer."""

    def __init__(self, table: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> None:
        self.table, self.positions = table, positions
        self.fused = table.fused and cpu_fused_ops.supports(positions.device, dtype)
        if not self.fused:
            self.cos, self.sin = table.lookup(positions, dtype)

    def apply(self, qkv: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """Rotate the first `heads` heads of qkv [T, >= heads * head_dim] -> [T, heads, head_dim] (a view of
        qkv when fused: rotated in place)."""
        t = qkv.shape[0]
        if self.fused:
            cpu_fused_ops.rotary_(qkv, heads, head_dim, self.positions, self.table.cos, self.table.sin_signed)
            return qkv[:, : heads * head_dim].view(t, heads, head_dim)
        return apply_rotary(qkv[:, : heads * head_dim].view(t, heads, head_dim), self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (q and k heads together) rotated by cos / signed sin [T, 1, D].

    Equals transformers' `x * cos + rotate_half(x) * sin` up to one rounding (addcmul may fuse the
    multiply-add); the engine tests hold it token-exact and within 1e-4 in logprobs."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)
