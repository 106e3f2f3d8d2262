"""Mixtral: the Llama decoder (sliding window where the config sets one) with a sparse MoE MLP: softmax over the
router logits, the top 2 (`num_experts_per_tok`) experts renormalised, expert outputs scaled in float32."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import ReplicatedLinear
from engine.layers.moe import FusedMoE
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class MixtralMoE(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_local_experts)
        self.experts = FusedMoE(
            cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size,
            renormalize=True, act=cfg.hidden_act, float_weights=True,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg, layer: int) -> nn.Module:
        return MixtralMoE(cfg)


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel
    decoder_stack = False
    cuda_graphs = False  # expert routing reads its per-expert row counts on the host

    def rename(self, name: str) -> str | None:
        return name.replace(".block_sparse_moe.", ".mlp.")

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        heads, kv_heads, _ = super().tp_shape(cfg)
        return heads, kv_heads, int(cfg.intermediate_size)
