"""Rotary position embedding with a precomputed cos/sin table; every rope type transformers defines.

The inverse frequencies come from transformers' own rope functions (linear, dynamic, yarn, llama3, longrope), so
scaled-rope checkpoints match the reference. Tables are float32, indexed by absolute position, and cover the first
`rotary_dim` dims of a head (partial rotary: the rest pass through). `dynamic` and `longrope` depend on the sequence
length: row p is built for a sequence of p + 1 tokens (what transformers `generate` uses for a token decoded at p).
A `StepRotary` holds one step's positions and rotates each layer's q and k heads (in place, compiled, on CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from engine.layers import cpu_fused_ops


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """The config's rope parameters (those of `layer_type` where they are given per layer type, as in Gemma 3)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    return params


def _init_fn(rope_type: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r} in the model config")
    return ROPE_INIT_FUNCTIONS[rope_type]


def _default_inv_freq(params: dict, hf_config, head_dim: int) -> torch.Tensor:
    base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rope_angles(
    hf_config, head_dim: int, max_position: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """(angles [max_position, rotary_dim / 2] = position * inverse frequency, cos/sin scaling)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    positions = torch.arange(max_position, dtype=torch.float)
    kw = {"layer_type": layer_type} if layer_type is not None else {}
    if rope_type == "default":
        return positions[:, None] * _default_inv_freq(params, hf_config, head_dim)[None, :], 1.0
    init = _init_fn(rope_type)
    cpu = torch.device("cpu")
    if getattr(hf_config, "head_dim", None) is None:  # some configs (Mixtral) hold head_dim = None: the rope needs it
        hf_config = copy.copy(hf_config)
        hf_config.head_dim = head_dim
    inv_freq, scaling = init(hf_config, cpu, **kw)
    angles = positions[:, None] * inv_freq.float()[None, :]
    if rope_type == "dynamic":  # NTK base grows with the sequence: row p is for p + 1 tokens
        original = int(hf_config.max_position_embeddings)
        for p in range(original, max_position):  # seq_len as transformers passes it: an int64 tensor (float32 math)
            angles[p] = p * init(hf_config, cpu, seq_len=torch.tensor(p + 1), **kw)[0].float()
    elif rope_type == "longrope":  # the long factors once the sequence outgrows the original context
        original = int(params["original_max_position_embeddings"])
        if max_position > original:
            long_freq, scaling = init(hf_config, cpu, seq_len=original + 1, **kw)
            angles[original:] = positions[original:, None] * long_freq.float()[None, :]
    return angles, float(scaling)


class RotaryEmbedding(nn.Module):
    fused: bool = False  # CPU: rotate in place with the compiled op (cpu_fused_ops.py); full rotary only

    def __init__(self, hf_config, head_dim: int, max_position: int, layer_type: str | None = None) -> None:
        super().__init__()
        target = torch.empty(0).device  # the device the model is built on (`with device:`), meta included
        with torch.device("cpu"):  # transformers' rope functions and the table: on the CPU, whatever the target
            angles, scaling = rope_angles(hf_config, head_dim, max_position, layer_type)
            emb = torch.cat((angles, angles), dim=-1)  # [max_position, rotary_dim]
            cos, sin = emb.cos() * scaling, emb.sin() * scaling
            # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated): fewer ops per layer.
            half = emb.shape[1] // 2
            sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.head_dim, self.rotary_dim = head_dim, emb.shape[1]
        self.register_buffer("cos", cos.to(target), persistent=False)
        self.register_buffer("sin_signed", sin_signed.to(target), persistent=False)

    @property
    def partial(self) -> bool:
        return self.rotary_dim < self.head_dim

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions [T] -> each [T, 1, rotary_dim] (computed once per step)."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin_signed[positions].to(dtype).unsqueeze(1)

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype) -> StepRotary:
        return StepRotary(self, positions, dtype)


class StepRotary:
    """The rotation of one step's positions [T], shared by every layer."""

    def __init__(self, table: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> None:
        self.table, self.positions = table, positions
        self.fused = table.fused and not table.partial and cpu_fused_ops.supports(positions.device, dtype)
        if not self.fused:
            self.cos, self.sin = table.lookup(positions, dtype)

    def apply(self, qkv: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """Rotate the first `heads` heads of qkv [T, >= heads * head_dim] -> [T, heads, head_dim] (a view of
        qkv when fused: rotated in place)."""
        t = qkv.shape[0]
        if self.fused:
            cpu_fused_ops.rotary_(qkv, heads, head_dim, self.positions, self.table.cos, self.table.sin_signed)
            return qkv[:, : heads * head_dim].view(t, heads, head_dim)
        x = qkv[:, : heads * head_dim].view(t, heads, head_dim)
        if self.table.partial:
            rd = self.table.rotary_dim
            return torch.cat((apply_rotary(x[..., :rd], self.cos, self.sin), x[..., rd:]), dim=-1)
        return apply_rotary(x, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (q and k heads together) rotated by cos / signed sin [T, 1, D].

    Equals transformers' `x * cos + rotate_half(x) * sin` up to one rounding (addcmul may fuse the
    multiply-add); the engine tests hold it token-exact and within 1e-4 in logprobs."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)
