"""Model registry: `architectures[0]` (or `model_type` for GGUF configs) -> native model class, the choice between
the native implementation and the transformers fallback (`model_implementation`), and what the engine asks of a
model before building it (tensor-parallel shape, context length)."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module under engine.models, class); modules load on first use
_BY_ARCHITECTURE: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "StableLmForCausalLM": ("stablelm", "StableLmForCausalLM"),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", "GPTBigCodeForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "GemmaForCausalLM"),
    "T5ForConditionalGeneration": ("t5", "T5ForConditionalGeneration"),
}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "LlamaForCausalLM"}


def _load(arch: str) -> type[nn.Module]:
    module, name = _BY_ARCHITECTURE[arch]
    return getattr(importlib.import_module(f"engine.models.{module}"), name)


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def get_model_class(hf_config) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in _BY_ARCHITECTURE:
            return _load(arch)
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _load(_BY_MODEL_TYPE[model_type])
    raise ValueError(
        f"unsupported model architecture {getattr(hf_config, 'architectures', None) or model_type!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def model_implementation(hf_config, requested: str = "auto") -> str:
    """Which implementation serves the model: "native", or "transformers" (the fallback, in
    engine/models/transformers_fallback.py) for an architecture we do not implement or when `requested` forces it.
    ValueError (one line, naming the architecture) when the chosen path cannot serve the model."""
    if requested == "native":
        get_model_class(hf_config)  # raises naming the architecture and the supported ones
        return "native"
    if requested == "auto":
        try:
            get_model_class(hf_config)
            return "native"
        except ValueError:
            pass
    from engine.models.transformers_fallback import unsupported_reason

    why = unsupported_reason(hf_config)
    if why is None:
        return "transformers"
    arch = getattr(hf_config, "architectures", None) or getattr(hf_config, "model_type", None)
    native = ""
    if requested != "transformers":
        native = f"no native implementation (supported: {', '.join(supported_architectures())}), and "
    raise ValueError(
        f"unsupported model architecture {arch!r}: {native}the transformers fallback cannot serve it: {why}"
    )


def _class_or_base(hf_config):
    """The model's class; the shared base for a config no family claims (building it fails later, naming it)."""
    try:
        return get_model_class(hf_config)
    except ValueError:
        from engine.models.base import CausalLM

        return CausalLM


def tp_shape(hf_config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, MLP width) of the model: what a tensor-parallel degree must divide."""
    return _class_or_base(hf_config).tp_shape(hf_config)


def context_length(hf_config) -> int:
    """The model's own context length (positions it was built or scaled for)."""
    return _class_or_base(hf_config).context_length(hf_config)
