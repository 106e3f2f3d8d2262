"""Every model builds under torch.device("meta") with every rope scaling type transformers defines: no tensor is
made on another device than the one the model is built on (on CUDA that mix crashed scaled-rope models at start-up).
Every registered architecture must have a config here, so a new family is covered when it is registered.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from engine.models import _BY_ARCHITECTURE, get_model_class

SMALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
HALF = 8  # head_dim / 2 for the small shape above
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "longrope": {
        "rope_type": "longrope", "short_factor": [1.0] * HALF, "long_factor": [2.0] * HALF,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0,
    },
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0,
    },
}  # fmt: skip
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def _config(architecture: str, rope: dict):
    model_type = MODEL_TYPES[architecture]
    cfg = AutoConfig.for_model(model_type, **SMALL, rope_parameters=dict(rope))
    cfg.architectures = [architecture]
    return cfg


def test_every_registered_architecture_has_a_config_here() -> None:
    assert set(_BY_ARCHITECTURE) <= set(MODEL_TYPES), set(_BY_ARCHITECTURE) - set(MODEL_TYPES)


@pytest.mark.parametrize("architecture", sorted(MODEL_TYPES))
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_builds_on_the_meta_device(architecture: str, rope: str) -> None:
    cfg = _config(architecture, ROPES[rope])
    with torch.device("meta"):
        model = get_model_class(cfg)(cfg, max_position=256)
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}, devices
