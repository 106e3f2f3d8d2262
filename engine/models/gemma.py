"""Gemma 2 and Gemma 3 (text): embeddings scaled by sqrt(hidden), (1 + w) RMSNorms before and after both the
attention and the MLP, GeGLU (tanh GELU), queries scaled by query_pre_attn_scalar^-1/2, attention logits and final
logits soft-capped (when set), sliding-window and global layers alternating as `layer_types` says; Gemma 3 adds
q/k RMSNorms and a rope of its own per layer type (local and global bases)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import ActAndMul
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import GemmaRMSNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.models.base import QKV_GATE_UP_PACKED, CausalLM, head_dim_of, num_kv_heads_of, sliding_window_of


def _layer_type(cfg, layer: int) -> str:
    types = getattr(cfg, "layer_types", None)
    return types[layer] if types else "full_attention"


class GemmaAttention(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        hd, bias = head_dim_of(cfg), bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads, num_kv_heads_of(cfg), bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd
        self.qk_norm = cfg.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm, self.k_norm = GemmaRMSNorm(hd, cfg.rms_norm_eps), GemmaRMSNorm(hd, cfg.rms_norm_eps)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, hd, scale=cfg.query_pre_attn_scalar**-0.5,
            sliding_window=sliding_window_of(cfg, layer), logit_softcap=cfg.attn_logit_softcapping or None,
        )  # fmt: skip

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, h, hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = qkv[:, : (h + hkv) * hd]
        if self.qk_norm:
            q, k = qk.view(t, h + hkv, hd).split([h, hkv], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1).view(t, -1)
        qk = rope.apply(qk, h + hkv, hd)
        o = self.attn(qk[:, :h], qk[:, h:], qkv[:, (h + hkv) * hd :].view(t, hkv, hd))
        return self.o_proj(o.reshape(t, h * hd))


class GemmaMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ActAndMul(cfg.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        self.layer_type = _layer_type(cfg, layer)
        self.self_attn = GemmaAttention(cfg, layer)
        self.mlp = GemmaMLP(cfg)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # sqrt(hidden) rounded to the weights' dtype, as transformers scales (a plain float: CUDA-graph safe)
        scale = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32, device="cpu")
        self.normalizer = float(scale.to(torch.get_default_dtype()))
        hd = head_dim_of(cfg)
        per_type = cfg.model_type == "gemma3_text"  # Gemma 3: rope parameters per layer type
        types = sorted({_layer_type(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.rotary = nn.ModuleDict(
            {t: RotaryEmbedding(cfg, hd, max_position, layer_type=t if per_type else None) for t in types}
        )
        self.layers = nn.ModuleList([GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * self.normalizer
        ropes = {t: r.for_step(positions, x.dtype) for t, r in self.rotary.items()}
        for layer in self.layers:
            x = layer(ropes[layer.layer_type], x)
        return self.norm(x)


class GemmaForCausalLM(CausalLM):
    packed_modules = QKV_GATE_UP_PACKED

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg, max_position)
        self.final_logit_softcap = getattr(cfg, "final_logit_softcapping", None) or None
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)
