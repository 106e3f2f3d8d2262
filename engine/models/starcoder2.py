"""StarCoder2: LayerNorm, grouped-query attention with biases on every projection (`use_bias`), rotary positions, a
sliding window where the config sets one, and a GELU MLP (c_fc / c_proj)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import get_activation
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.models.base import CausalLM, head_dim_of, num_kv_heads_of, sliding_window_of


class Starcoder2Attention(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        hd, bias = head_dim_of(cfg), bool(cfg.use_bias)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads, num_kv_heads_of(cfg), bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd
        window = sliding_window_of(cfg, layer)
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5, sliding_window=window)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, h, hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = rope.apply(qkv, h + hkv, hd)
        o = self.attn(qk[:, :h], qk[:, h:], qkv[:, (h + hkv) * hd :].view(t, hkv, hd))
        return self.o_proj(o.reshape(t, h * hd))


class Starcoder2MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=bool(cfg.use_bias))
        self.c_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bool(cfg.use_bias))
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        self.self_attn = Starcoder2Attention(cfg, layer)
        self.mlp = Starcoder2MLP(cfg)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_epsilon)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(rope, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Starcoder2Model(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_position)
        self.layers = nn.ModuleList([Starcoder2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = LayerNorm(cfg.hidden_size, cfg.norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.for_step(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x)
        return self.norm(x)


class Starcoder2ForCausalLM(CausalLM):
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = Starcoder2Model(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)
