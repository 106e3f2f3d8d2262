"""Qwen3: the Llama decoder with a per-head RMSNorm on q and k (over head_dim, before the rotary), no qkv bias,
and sliding windows on the layers its config marks."""

from __future__ import annotations

import torch

from engine.layers.norm import RMSNorm
from engine.layers.rotary import StepRotary
from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg, layer: int) -> None:
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, hd = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        q = self.q_norm(qkv[:, : self.q_size].reshape(-1, hd))  # [T * H, hd]
        k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].reshape(-1, hd))  # [T * Hkv, hd]
        qk = rope.apply(torch.cat((q.view(t, -1), k.view(t, -1)), dim=1), self.num_heads + self.num_kv_heads, hd)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        o = self.attn(q, k, qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, hd))
        return self.o_proj(o.reshape(t, self.q_size))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model
    decoder_stack = False
