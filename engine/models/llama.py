"""Llama-family decoder (Llama 2/3, Mistral and Qwen2 with their sliding windows, Qwen2's qkv bias, SmolLM) built
from a HF config; Qwen3 and the Llama-shaped MoE families extend its classes (`attention_cls`, `make_mlp`).

Forward runs on a flattened batch: input_ids/positions [T] -> hidden [T, hidden_size]; logits are
computed only for the rows that sample. Checkpoint names map onto packed qkv / gate_up parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention.base import current_metadata
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.cpu_decoder_stack import DecoderStack
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.models.base import QKV_GATE_UP_PACKED, CausalLM, head_dim_of, num_kv_heads_of, sliding_window_of


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        hd = head_dim_of(cfg)
        n_kv = num_kv_heads_of(cfg)
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        qkv_bias = attention_bias or bool(getattr(cfg, "qkv_bias", False)) or cfg.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads, n_kv, bias=qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=attention_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        window = sliding_window_of(cfg, layer)
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5, sliding_window=window)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, qk_size = x.shape[0], self.q_size + self.kv_size
        qkv = self.qkv_proj(x)
        # Rotate q and k heads in one pass: [T, H + Hkv, hd].
        qk = rope.apply(qkv, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        o = self.attn(q, k, qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim))
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, intermediate_size: int | None = None) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter] * 2, bias=bias)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[nn.Module] = LlamaAttention

    def __init__(self, cfg, layer: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer)
        self.mlp = self.make_mlp(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, rope: StepRotary, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def make_mlp(self, cfg, layer: int) -> nn.Module:
        return LlamaMLP(cfg)


class LlamaModel(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_position)
        self.layers = nn.ModuleList([self.layer_cls(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.stack: DecoderStack | None = None  # the layers as one compiled call (bf16 CPU), see use_decoder_stack

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        meta = current_metadata()
        if self.stack is not None and meta is not None and self.stack.runs(meta):
            return self.stack(x, positions, meta)
        rope = self.rotary.for_step(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    model_cls: type[LlamaModel] = LlamaModel
    decoder_stack: bool = True  # the compiled stack runs Llama's exact layer only
    packed_modules = QKV_GATE_UP_PACKED

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def use_decoder_stack(self) -> bool:
        """Run the layer loop as one compiled call where it can (after use_fused_cpu_ops and the caches are bound);
        -> whether it will."""
        if not self.decoder_stack:
            return False
        self.model.stack = DecoderStack.build(self.model)
        return self.model.stack is not None
