"""Tiny random checkpoints of every native family beyond Llama, written offline with transformers (float32): hidden
64, 2 layers, the shared trained tokenizer's vocabulary. Each switches on the config features the engine must
reproduce (ALiBi, partial rotary, parallel residual, soft-capping, sliding windows, qk-norm, MoE, ...).

Random init leaves biases at zero and norms at one: both are drawn at random here, so a misplaced one shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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
WINDOW = 16  # shorter than most test prompts

FAMILY_SPECS: dict[str, FamilySpec] = {
    # Qwen3: q/k RMSNorm; layer 1 windowed (use_sliding_window from max_window_layers on)
    "qwen3": FamilySpec(
        "qwen3", dict(LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
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
}
