"""StarCoder / SantaCoder (GPTBigCode): learned absolute positions added to the token embeddings, LayerNorm,
multi-query attention (one K/V head; `multi_query` off: one per query head, fused per head), a GELU MLP."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import get_activation
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import LayerNorm
from engine.models.base import CausalLM


def _kv_heads(cfg) -> int:
    return 1 if cfg.multi_query else cfg.num_attention_heads


class GPTBigCodeAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        heads = cfg.num_attention_heads
        hd = cfg.hidden_size // heads
        layout = "contiguous" if cfg.multi_query else "per_head"
        self.c_attn = QKVParallelLinear(cfg.hidden_size, hd, heads, _kv_heads(cfg), bias=True, fused_layout=layout)
        self.c_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.num_heads, self.num_kv_heads, self.head_dim = self.c_attn.num_heads, self.c_attn.num_kv_heads, hd
        scale = hd**-0.5 if cfg.scale_attn_weights else 1.0
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h, hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.c_attn(x).split([h * hd, hkv * hd, hkv * hd], dim=1)
        o = self.attn(q.view(t, h, hd), k.view(t, hkv, hd), v.view(t, hkv, hd))
        return self.c_proj(o.reshape(t, h * hd))


class GPTBigCodeMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.hidden_size
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, cfg.hidden_size, bias=True)
        self.act = get_activation(cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTBigCodeBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = GPTBigCodeAttention(cfg)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = GPTBigCodeMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.ln_1(x)) + x
        return x + self.mlp(self.ln_2(x))


class GPTBigCodeModel(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = VocabParallelEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList([GPTBigCodeBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPTBigCodeForCausalLM(CausalLM):
    base_prefix = "transformer"

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPTBigCodeModel(cfg)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        return int(cfg.num_attention_heads), _kv_heads(cfg), int(cfg.n_inner or 4 * cfg.hidden_size)
