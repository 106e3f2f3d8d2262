"""Model registry: `architectures[0]` (or `model_type` for GGUF configs) -> native model class."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM

_BY_ARCHITECTURE: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
_BY_MODEL_TYPE = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def get_model_class(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    supported = ", ".join(sorted(_BY_ARCHITECTURE))
    raise ValueError(
        f"unsupported model architecture {getattr(hf_config, 'architectures', None) or model_type!r}; "
        f"supported: {supported}"
    )
