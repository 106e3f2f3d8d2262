"""StableLM (2 / Zephyr / StableCode): LayerNorm, partial rotary, optional q/k/v biases, an optional LayerNorm of
its own per query and key head (`qk_layernorm`), a SiLU-gated MLP, and optionally the parallel residual
x + attn(ln(x)) + mlp(ln(x))."""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import QKVParallelLinear, RowParallelLinear
from engine.layers.norm import LayerNorm, PerHeadLayerNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.models.base import QKV_GATE_UP_PACKED, CausalLM, head_dim_of, num_kv_heads_of, sliding_window_of
from engine.models.llama import LlamaMLP
from engine.parallel import get_parallel_state

_HEAD_NORM = re.compile(r"(.*\.[qk]_layernorm)\.norms\.(\d+)\.weight")


class StableLmAttention(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        hd, n_kv = head_dim_of(cfg), num_kv_heads_of(cfg)
        bias = bool(getattr(cfg, "use_qkv_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads, n_kv, bias=bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.q_layernorm = self.k_layernorm = None
        if getattr(cfg, "qk_layernorm", False):
            tp = get_parallel_state()
            eps, heads = cfg.layer_norm_eps, cfg.num_attention_heads
            first_kv = tp.rank * n_kv // tp.world_size if n_kv < tp.world_size else tp.rank * self.num_kv_heads
            self.q_layernorm = PerHeadLayerNorm(self.num_heads, hd, eps, tp.rank * self.num_heads, heads)
            self.k_layernorm = PerHeadLayerNorm(self.num_kv_heads, hd, eps, first_kv, n_kv)
        window = sliding_window_of(cfg, layer)
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5, sliding_window=window)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, h, hkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size]
        if self.q_layernorm is not None:
            q = self.q_layernorm(qk[:, : self.q_size].view(t, h, hd))
            k = self.k_layernorm(qk[:, self.q_size :].view(t, hkv, hd))
            qk = torch.cat((q, k), dim=1).view(t, -1)
        qk = rope.apply(qk, h + hkv, hd)
        o = self.attn(qk[:, :h], qk[:, h:], qkv[:, self.q_size + self.kv_size :].view(t, hkv, hd))
        return self.o_proj(o.reshape(t, self.q_size))


class StableLmDecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        self.use_parallel_residual = bool(getattr(cfg, "use_parallel_residual", False))
        self.self_attn = StableLmAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        if not self.use_parallel_residual:
            self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attn(rope, h)
        if self.use_parallel_residual:
            return x + attn + self.mlp(h)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class StableLmModel(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_position)
        self.layers = nn.ModuleList([StableLmDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.for_step(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x)
        return self.norm(x)


class StableLmForCausalLM(CausalLM):
    packed_modules = QKV_GATE_UP_PACKED

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = StableLmModel(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def _target(self, name: str) -> tuple[str, object]:
        m = _HEAD_NORM.fullmatch(name)  # one checkpoint tensor per head -> the heads' [H, hd] weight
        return (f"{m.group(1)}.weight", int(m.group(2))) if m else super()._target(name)
