"""Qwen2-MoE and Qwen3-MoE: the Qwen2 (qkv bias) or Qwen3 (q/k norm) decoder with sparse MoE MLPs on the layers
`decoder_sparse_step` / `mlp_only_layers` select: softmax top-k, renormalised when `norm_topk_prob`; Qwen2-MoE adds a
shared expert scaled by sigmoid(shared_expert_gate(x))."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.layers.linear import ReplicatedLinear
from engine.layers.moe import FusedMoE
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from engine.models.qwen3 import Qwen3Attention


def _num_experts(cfg) -> int:
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0) or 0)


class QwenMoE(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        experts = _num_experts(cfg)
        self.gate = ReplicatedLinear(cfg.hidden_size, experts)
        self.experts = FusedMoE(
            experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size,
            renormalize=bool(cfg.norm_topk_prob), act=cfg.hidden_act,
        )  # fmt: skip
        shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
        self.shared_expert = LlamaMLP(cfg, shared) if shared else None
        self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def _sparse(cfg, layer: int) -> bool:
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    only_mlp = getattr(cfg, "mlp_only_layers", None) or []
    return layer not in only_mlp and _num_experts(cfg) > 0 and (layer + 1) % step == 0


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg, layer: int) -> nn.Module:
        return QwenMoE(cfg) if _sparse(cfg, layer) else LlamaMLP(cfg)


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen2MoeModel(LlamaModel):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2MoeModel
    decoder_stack = False
    cuda_graphs = False  # expert routing reads its per-expert row counts on the host

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        """Every MLP width must split: the experts', the shared expert's and the dense layers'."""
        heads, kv_heads, _ = super().tp_shape(cfg)
        dense = any(not _sparse(cfg, i) for i in range(cfg.num_hidden_layers))
        widths = [cfg.moe_intermediate_size, getattr(cfg, "shared_expert_intermediate_size", 0) or 0]
        widths += [cfg.intermediate_size] if dense else []
        return heads, kv_heads, math.gcd(*widths)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    model_cls = Qwen3MoeModel
