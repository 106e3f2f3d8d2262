"""Tiny random checkpoints of architectures we have no native implementation of, served through the transformers
fallback (engine/models/transformers_fallback.py). Each switches on what sets it apart from Llama, so a path that
ignored transformers' own modelling code would show.
"""

from __future__ import annotations

from tests.support.family_models import LLAMA_LIKE, FamilySpec

FALLBACK_SPECS: dict[str, FamilySpec] = {
    # OLMo: LayerNorm without parameters, q/k/v clipped
    "olmo": FamilySpec("olmo", dict(LLAMA_LIKE, clip_qkv=3.0), seed=41),
    # Cohere (Command-R): parallel attention + MLP over one LayerNorm, interleaved rotary, per-head q/k norms,
    # logits scaled by the head
    "cohere": FamilySpec("cohere", dict(LLAMA_LIKE, use_qk_norm=True, logit_scale=0.5), seed=42),
    # Granite: attention scale, embedding / residual multipliers and logits divided by a scaling factor
    "granite": FamilySpec(
        "granite",
        dict(
            LLAMA_LIKE, attention_multiplier=0.2, embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0
        ),
        seed=43,
    ),
}
