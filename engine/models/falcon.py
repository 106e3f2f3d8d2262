"""Falcon: LayerNorm, one fused query_key_value (multi-query [q; k; v], grouped per KV head in the
`new_decoder_architecture`, or per head), rotary positions or ALiBi (`alibi`), a GELU MLP, and the parallel block
x + attn(ln(x)) + mlp(ln(x)) (two norms, ln_attn and ln_mlp, in the new architecture; sequential without
`parallel_attn`)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import get_activation
from engine.layers.alibi import rank_alibi_slopes
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.models.base import CausalLM


def _kv_heads(cfg) -> int:
    if cfg.new_decoder_architecture:
        return cfg.num_kv_heads
    return 1 if cfg.multi_query else cfg.num_attention_heads


def _layout(cfg) -> str:
    if cfg.new_decoder_architecture:
        return "grouped"
    return "contiguous" if cfg.multi_query else "per_head"


class FalconAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        heads = cfg.num_attention_heads
        hd = cfg.hidden_size // heads
        self.query_key_value = QKVParallelLinear(
            cfg.hidden_size, hd, heads, _kv_heads(cfg), bias=cfg.bias, fused_layout=_layout(cfg)
        )
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        qkv = self.query_key_value
        self.num_heads, self.num_kv_heads, self.head_dim = qkv.num_heads, qkv.num_kv_heads, hd
        # ALiBi: transformers adds the bias before scaling by 1/sqrt(hd), so the slopes carry the scale
        slopes = rank_alibi_slopes(heads) * hd**-0.5 if cfg.alibi else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5, alibi_slopes=slopes)

    def forward(self, rope: StepRotary | None, x: torch.Tensor) -> torch.Tensor:
        t, h, hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.query_key_value(x)
        qk = qkv[:, : (h + hkv) * hd].view(t, h + hkv, hd) if rope is None else rope.apply(qkv, h + hkv, hd)
        o = self.attn(qk[:, :h], qk[:, h:], qkv[:, (h + hkv) * hd :].view(t, hkv, hd))
        return self.dense(o.reshape(t, h * hd))


class FalconMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        inner = cfg.ffn_hidden_size or 4 * cfg.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, inner, bias=cfg.bias)
        self.dense_4h_to_h = RowParallelLinear(inner, cfg.hidden_size, bias=cfg.bias)
        self.act = get_activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.new_arch, self.parallel = bool(cfg.new_decoder_architecture), bool(cfg.parallel_attn)
        self.two_norms = self.new_arch and (cfg.num_ln_in_parallel_attn or 2) == 2
        self.self_attention = FalconAttention(cfg)
        self.mlp = FalconMLP(cfg)
        if self.two_norms:
            self.ln_attn, self.ln_mlp = LayerNorm(h, eps), LayerNorm(h, eps)
        else:
            self.input_layernorm = LayerNorm(h, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(h, eps)

    def forward(self, rope: StepRotary | None, x: torch.Tensor) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(rope, attn_in)
        if not self.new_arch and not self.parallel:  # sequential: the MLP reads the attention's residual
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp(mlp_in) + attn)


class FalconModel(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        hd = cfg.hidden_size // cfg.num_attention_heads
        self.rotary = None if cfg.alibi else RotaryEmbedding(cfg, hd, max_position)
        self.h = nn.ModuleList([FalconDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        rope = None if self.rotary is None else self.rotary.for_step(positions, x.dtype)
        for layer in self.h:
            x = layer(rope, x)
        return self.ln_f(x)


class FalconForCausalLM(CausalLM):
    base_prefix = "transformer"

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = FalconModel(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        return int(cfg.num_attention_heads), _kv_heads(cfg), int(cfg.ffn_hidden_size or 4 * cfg.hidden_size)
