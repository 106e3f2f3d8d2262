"""Rotary embedding against transformers' own: the cos/sin tables (default, linear, llama3 and yarn rope
types) and the rotation of q/k heads agree with LlamaRotaryEmbedding + apply_rotary_pos_emb.
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


def test_dynamic_rope_is_refused() -> None:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        RotaryEmbedding(cfg, 16, max_position=128)
