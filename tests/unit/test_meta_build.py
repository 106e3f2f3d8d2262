"""Every model builds under torch.device("meta") with every rope scaling type transformers defines: no tensor is
made on another device than the one the model is built on (on CUDA that mix crashed scaled-rope models at start-up).
Every registered architecture must have a config here, so a new family is covered when it is registered.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
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
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
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
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "GPTNeoXForCausalLM": "gpt_neox",
    "StableLmForCausalLM": "stablelm",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
    "Starcoder2ForCausalLM": "starcoder2",
    "FalconForCausalLM": "falcon",
    "BloomForCausalLM": "bloom",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "T5ForConditionalGeneration": "t5",
}
EXTRA = {  # full rotary (the longrope factors above are sized for it), experts, ALiBi
    "qwen2_moe": MOE, "qwen3_moe": dict(MOE, head_dim=16), "mixtral": MOE, "gpt_neox": dict(rotary_pct=1.0),
    "stablelm": dict(partial_rotary_factor=1.0), "falcon": dict(alibi=True), "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16),
}  # fmt: skip


def _config(architecture: str, rope: dict):
    model_type = MODEL_TYPES[architecture]
    rope = dict(rope)
    if model_type in ("gpt_neox", "stablelm"):
        rope["partial_rotary_factor"] = 1.0
    if model_type == "gemma3_text":  # rope parameters per layer type
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": rope}
    cfg = AutoConfig.for_model(model_type, **SMALL, **EXTRA.get(model_type, {}), rope_parameters=rope)
    cfg.architectures = [architecture]
    return cfg


def test_every_registered_architecture_has_a_config_here() -> None:
    assert set(_BY_ARCHITECTURE) <= set(MODEL_TYPES), set(_BY_ARCHITECTURE) - set(MODEL_TYPES)


def _accepted(architecture: str, rope: str) -> bool:
    """Whether transformers' own config takes this rope type for this family (Phi-3 takes longrope only, ...)."""
    try:
        _config(architecture, ROPES[rope])
    except (ValueError, KeyError, TypeError, StrictDataclassClassValidationError):
        return False
    return True


COMBINATIONS = [(a, r) for a in sorted(MODEL_TYPES) for r in sorted(ROPES) if _accepted(a, r)]


def test_every_family_builds_with_most_rope_types() -> None:
    for architecture in MODEL_TYPES:
        assert sum(a == architecture for a, _ in COMBINATIONS) >= 2, architecture


@pytest.mark.parametrize(("architecture", "rope"), COMBINATIONS)
def test_builds_on_the_meta_device(architecture: str, rope: str) -> None:
    cfg = _config(architecture, ROPES[rope])
    with torch.device("meta"):
        model = get_model_class(cfg)(cfg, max_position=256)
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}, devices
