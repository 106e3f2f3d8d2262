"""BLOOM: ALiBi position biases (no rotary), a LayerNorm on the word embeddings, LayerNorm blocks, a fused
query_key_value laid out per head, BLOOM's own tanh GELU, and optionally the residual taken after the norm
(`apply_residual_connection_post_layernorm`)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import bloom_gelu
from engine.layers.alibi import rank_alibi_slopes
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import LayerNorm
from engine.models.base import CausalLM


class BloomAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        heads = cfg.num_attention_heads
        hd = cfg.hidden_size // heads
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, hd, heads, heads, bias=True, fused_layout="per_head")
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.num_heads, self.head_dim = self.query_key_value.num_heads, hd
        slopes = rank_alibi_slopes(heads)
        self.attn = Attention(self.num_heads, self.num_heads, hd, scale=hd**-0.5, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h, hd = x.shape[0], self.num_heads, self.head_dim
        q, k, v = self.query_key_value(x).view(t, 3 * h, hd).split(h, dim=1)
        return self.dense(self.attn(q, k, v).reshape(t, h * hd))


class BloomMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, 4 * cfg.hidden_size, bias=True)
        self.dense_4h_to_h = RowParallelLinear(4 * cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = BloomMLP(cfg)
        self.post_ln_residual = bool(cfg.apply_residual_connection_post_layernorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.input_layernorm(x)
        x = (ln if self.post_ln_residual else x) + self.self_attention(ln)
        ln = self.post_attention_layernorm(x)
        return (ln if self.post_ln_residual else x) + self.mlp(ln)


class BloomModel(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.h = nn.ModuleList([BloomBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class BloomForCausalLM(CausalLM):
    base_prefix = "transformer"

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = BloomModel(cfg)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        return int(cfg.num_attention_heads), int(cfg.num_attention_heads), 4 * int(cfg.hidden_size)
