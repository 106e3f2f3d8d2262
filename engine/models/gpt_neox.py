"""GPT-NeoX / Pythia: LayerNorm, a fused query_key_value with q, k, v interleaved per head, partial rotary
(`rotary_pct` / `partial_rotary_factor` of each head), a GELU MLP, and the parallel residual
x + attn(ln1(x)) + mlp(ln2(x)) (sequential when `use_parallel_residual` is off)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import get_activation
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.models.base import CausalLM, head_dim_of, sliding_window_of


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        hd, heads, bias = head_dim_of(cfg), cfg.num_attention_heads, bool(getattr(cfg, "attention_bias", True))
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, hd, heads, heads, bias=bias, fused_layout="per_head")
        self.dense = RowParallelLinear(heads * hd, cfg.hidden_size, bias=bias)
        self.num_heads, self.head_dim = self.query_key_value.num_heads, hd
        window = sliding_window_of(cfg, layer)
        self.attn = Attention(self.num_heads, self.num_heads, hd, scale=hd**-0.5, sliding_window=window)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, h, hd = x.shape[0], self.num_heads, self.head_dim
        qkv = self.query_key_value(x)  # [T, (q | k | v) * H * hd] after loading
        qk = rope.apply(qkv, 2 * h, hd)
        o = self.attn(qk[:, :h], qk[:, h:], qkv[:, 2 * h * hd :].view(t, h, hd))
        return self.dense(o.reshape(t, h * hd))


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.dense_4h_to_h = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        self.use_parallel_residual = bool(cfg.use_parallel_residual)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attention = GPTNeoXAttention(cfg, layer)
        self.mlp = GPTNeoXMLP(cfg)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention(rope, self.input_layernorm(x))
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_position)
        self.layers = nn.ModuleList([GPTNeoXLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_in(input_ids)
        rope = self.rotary.for_step(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(CausalLM):
    base_prefix = "gpt_neox"

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.gpt_neox = GPTNeoXModel(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions)

    def rename(self, name: str) -> str | None:
        return "lm_head.weight" if name == "embed_out.weight" else name
