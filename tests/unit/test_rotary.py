"""Rotary embedding against transformers' own: the cos/sin tables (default, linear, llama3, yarn; dynamic and longrope
by position) and the rotation of q/k heads (full and partial) agree with transformers' rotary + apply_rotary_pos_emb.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from engine.layers.rotary import RotaryEmbedding, apply_rotary

ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}  # fmt: skip


@pytest.mark.parametrize("rope", sorted(ROPE))
def test_rotation_matches_transformers(rope: str) -> None:
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_parameters=ROPE[rope],
    )  # fmt: skip
    head_dim, positions = 16, torch.tensor([0, 1, 5, 63, 64, 200, 255])
    ours = RotaryEmbedding(cfg, head_dim, max_position=256)
    theirs = LlamaRotaryEmbedding(cfg)
    torch.manual_seed(0)
    q, k = torch.randn(len(positions), 4, head_dim), torch.randn(len(positions), 2, head_dim)
    cos, sin = theirs(q, positions.unsqueeze(0))  # [1, T, D]
    q_ref, k_ref = apply_rotary_pos_emb(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin
    )  # [1, heads, T, D]
    rotated = apply_rotary(torch.cat([q, k], dim=1), *ours.lookup(positions, torch.float32))
    torch.testing.assert_close(rotated[:, :4], q_ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rotated[:, 4:], k_ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_length_dependent_tables_match_transformers_at_each_position(rope: str) -> None:
    """dynamic / longrope: the row of position p is transformers' table for a sequence of p + 1 tokens (what
    `generate` uses for the token it decodes at p), before and past the original context (64)."""
    params = {
        "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 8 for i in range(8)],
                     "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 64},
    }[rope]  # fmt: skip
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64 if rope == "dynamic"
        else 256, rope_parameters=params,
    )  # fmt: skip
    ours = RotaryEmbedding(cfg, 16, max_position=256)
    theirs = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, 1, 16)
    for p in (0, 5, 62, 63, 64, 65, 100, 200, 255):  # ascending: transformers' dynamic table only grows
        cos, sin = theirs(x, torch.tensor([[p]]))
        torch.testing.assert_close(ours.cos[p], cos[0, 0], atol=1e-6, rtol=1e-5)
        half = sin[0, 0, :8]
        torch.testing.assert_close(ours.sin_signed[p], torch.cat((-half, half)), atol=1e-6, rtol=1e-5)
    original = ours.cos[63].clone()
    assert not torch.equal(RotaryEmbedding(cfg, 16, max_position=256).cos[200], original)


def test_partial_rotary_rotates_the_leading_dims_only() -> None:
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply

    cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=128)
    ours = RotaryEmbedding(cfg, 16, max_position=128)
    assert (ours.rotary_dim, ours.partial) == (4, True)
    positions = torch.tensor([0, 3, 77, 127])
    torch.manual_seed(0)
    q, k = torch.randn(4, 4, 16), torch.randn(4, 4, 16)
    cos, sin = GPTNeoXRotaryEmbedding(cfg)(q, positions.unsqueeze(0))
    q_ref, k_ref = neox_apply(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin)
    rotated = ours.for_step(positions, torch.float32).apply(torch.cat([q, k], dim=1).view(4, -1), 8, 16)
    torch.testing.assert_close(rotated[:, :4], q_ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rotated[:, 4:], k_ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
