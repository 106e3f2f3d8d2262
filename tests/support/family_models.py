"""Tiny random checkpoints of every native family beyond Llama, written offline with transformers (float32): hidden
64, 2 layers, the shared trained tokenizer's vocabulary. Each switches on the config features the engine must
reproduce (ALiBi, partial rotary, parallel residual, soft-capping, sliding windows, qk-norm, MoE, ...).

Random init leaves biases at zero and norms at one: both are drawn at random here, so a misplaced one shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


@dataclass(frozen=True)
class FamilySpec:
    """One tiny checkpoint of `model_type` with `config` over the defaults below; `seq2seq` for T5."""

    model_type: str
    config: dict = field(default_factory=dict, hash=False)
    seed: int = 0
    seq2seq: bool = False
    tp: bool = True  # the tensor-parallel test runs it at 2 ranks
    embed_scale: float = 1.0  # shrink the (tied) embeddings where they would drown the layers' output
    separate_lm_head: bool = False  # write an lm_head.weight of its own (transformers 5 always saves T5's tied)

    def written(self, path: Path) -> None:
        """After save_pretrained: add a random lm_head.weight distinct from the embeddings (Flan-T5's layout)."""
        if not self.separate_lm_head:
            return
        weights = load_file(path / "model.safetensors")
        torch.manual_seed(self.seed + 1)
        weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"]) * 0.5
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    def build(self, vocab_size: int) -> PreTrainedModel:
        kw = dict(
            vocab_size=vocab_size, initializer_range=0.2, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
        )
        kw.update(self.config)
        cfg = AutoConfig.for_model(self.model_type, **kw)
        torch.manual_seed(self.seed)
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        model = auto.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(self.embed_scale)
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.2)
                elif p.dim() == 1:  # norm scales (Gemma's are 1 + w, initialised at 0)
                    p.add_(torch.randn_like(p) * 0.1)
        return model.float().eval()


LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
MOE = dict(LLAMA_LIKE, num_experts_per_tok=2)
LAYERNORM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
    tie_word_embeddings=False,
)  # fmt: skip
WINDOW = 16  # shorter than most test prompts

FAMILY_SPECS: dict[str, FamilySpec] = {
    # Qwen3: q/k RMSNorm; layer 1 windowed (use_sliding_window from max_window_layers on)
    "qwen3": FamilySpec(
        "qwen3",
        dict(LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        seed=21,
    ),
    # Mistral v0.1's window on every layer; Qwen2's use_sliding_window on the layers past max_window_layers
    "mistral_window": FamilySpec("mistral", dict(LLAMA_LIKE, sliding_window=WINDOW), seed=22),
    "qwen2_window": FamilySpec(
        "qwen2", dict(LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), seed=23
    ),
    # MoE: top-2 of 4 experts
    "mixtral": FamilySpec("mixtral", dict(MOE, num_local_experts=4), seed=24),
    "qwen2_moe": FamilySpec(
        "qwen2_moe",
        dict(MOE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=96, mlp_only_layers=[1]),
        seed=25,
    ),
    "qwen3_moe": FamilySpec(
        "qwen3_moe", dict(MOE, head_dim=16, num_experts=4, moe_intermediate_size=64, norm_topk_prob=True), seed=26
    ),
    # Phi-3: fused qkv / gate_up checkpoints, partial rotary, a window on every layer
    "phi3": FamilySpec("phi3", dict(LLAMA_LIKE, partial_rotary_factor=0.5, sliding_window=WINDOW), seed=27),
    # GPT-NeoX: parallel residual, partial rotary (rotary_pct), fused qkv per head
    "gpt_neox": FamilySpec("gpt_neox", dict(LAYERNORM, rotary_pct=0.25, use_parallel_residual=True), seed=28),
    # StableLM: partial rotary, per-head qk LayerNorm, parallel residual, qkv bias
    "stablelm": FamilySpec(
        "stablelm",
        dict(
            LAYERNORM,
            num_key_value_heads=2,
            partial_rotary_factor=0.5,
            qk_layernorm=True,
            use_parallel_residual=True,
            use_qkv_bias=True,
        ),
        seed=29,
    ),  # fmt: skip
    # StarCoder: multi-query attention, learned absolute positions
    "gpt_bigcode": FamilySpec(
        "gpt_bigcode", dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512, multi_query=True), seed=30
    ),
    # StarCoder2: GQA, biases, a window, LayerNorm
    "starcoder2": FamilySpec("starcoder2", dict(LAYERNORM, num_key_value_heads=2, sliding_window=WINDOW), seed=31),
    # Falcon: the new decoder architecture (grouped qkv, two norms), rotary
    "falcon": FamilySpec(
        "falcon",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            ffn_hidden_size=128,
            bias=True,
            max_position_embeddings=512,
        ),
        seed=32,
    ),  # fmt: skip
    # Falcon-7B style with ALiBi: multi-query, one norm, parallel attention (contexts < 256: see test notes)
    "falcon_alibi": FamilySpec(
        "falcon",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            alibi=True,
            parallel_attn=True,
            ffn_hidden_size=128,
            bias=False,
        ),
        seed=33,
    ),  # fmt: skip
    # BLOOM: ALiBi (6 heads: not a power of two), embedding LayerNorm, fused qkv per head
    "bloom": FamilySpec("bloom", dict(hidden_size=96, n_layer=2, n_head=6, initializer_range=0.5), seed=34),
    # Gemma 2: soft-capping (attention and final), windows on alternate layers, (1 + w) norms, GeGLU
    "gemma2": FamilySpec(
        "gemma2",
        dict(
            LLAMA_LIKE,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=True,
        ),
        seed=35,
        embed_scale=0.1,
    ),  # fmt: skip
    # Gemma 3: q/k norms, local / global rope bases per layer type, windows on alternate layers
    "gemma3": FamilySpec(
        "gemma3_text",
        dict(
            LLAMA_LIKE,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention"],
            rope_local_base_freq=100.0,
        ),
        seed=36,
        embed_scale=0.1,
    ),  # fmt: skip
}

# T5: relative buckets (8, reaching the log-spaced ones within the test prompts), ReLU, the decoder output scaled by
# d_model^-1/2; Flan-T5: gated GELU, no output scaling. Both with an lm_head of their own: tied to the embeddings, a
# tiny T5 repeats one token (t5_tied checks that loading path through its logprobs).
T5 = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=20, decoder_start_token_id=PAD_ID,
)  # fmt: skip
FAMILY_SPECS["t5"] = FamilySpec(
    "t5", dict(T5, feed_forward_proj="relu"), seed=37, seq2seq=True, tp=False, separate_lm_head=True
)
FAMILY_SPECS["t5_tied"] = FamilySpec("t5", dict(T5, feed_forward_proj="relu"), seed=39, seq2seq=True, tp=False)
FAMILY_SPECS["flan_t5"] = FamilySpec(
    "t5",
    dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    seed=38,
    seq2seq=True,
    tp=False,
    separate_lm_head=True,
)

# Llama with each rope scaling type, its original context (32) shorter than the tests' contexts
_HALF = 8  # head_dim / 2
ROPE_SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.0}, 32),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, 32),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    "llama3": (
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
        128,
    ),
    "longrope": (
        {"rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(_HALF)],
         "long_factor": [1.5 + i for i in range(_HALF)], "original_max_position_embeddings": 32},
        128,
    ),
}  # fmt: skip
ROPE_SPECS: dict[str, FamilySpec] = {
    f"rope_{kind}": FamilySpec(
        "llama",
        dict(LLAMA_LIKE, max_position_embeddings=context, rope_parameters={"rope_theta": 10000.0, **params}),
        seed=40 + i,
    )
    for i, (kind, (params, context)) in enumerate(ROPE_SCALINGS.items())
}
