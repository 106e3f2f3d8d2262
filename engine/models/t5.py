"""T5 / Flan-T5 (encoder-decoder): the decoder runs in the engine's steps over the paged KV cache (relative-position
buckets as its attention's `position_bias`, scores unscaled); the encoder runs once per request and its output's
cross-attention K/V stay cached per request until the engine releases it. One rank only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.layers.activation import get_activation
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import ReplicatedLinear
from engine.layers.norm import RMSNorm
from engine.layers.relative_bias import RelativePositionBias
from engine.models.base import CausalLM
from engine.parallel import get_parallel_state
from engine.step_input import StepInput
from engine.weight_slice import Weight, materialize

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: K, V [H, encoder_len, d_kv]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """T5 attention, unscaled: q [q_len, H, d], k/v [H, n, d], bias [H, q_len, n] or None -> [q_len, H, d]."""
    scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2))
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1)


class T5Attention(nn.Module):
    def __init__(self, cfg, relative_bias: bool, decoder: bool, cross: bool = False) -> None:
        super().__init__()
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = self.heads * self.d_kv
        self.q, self.k = ReplicatedLinear(cfg.d_model, inner), ReplicatedLinear(cfg.d_model, inner)
        self.v, self.o = ReplicatedLinear(cfg.d_model, inner), ReplicatedLinear(inner, cfg.d_model)
        if relative_bias:  # block 0's: shared by every layer of its stack
            self.relative_attention_bias = RelativePositionBias(
                cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, self.heads, not decoder
            )
        self.attn: Attention | None = None  # the decoder's self-attention over the paged cache (see T5Stack)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d_model] -> K, V [H, n, d_kv]."""
        n = x.shape[0]
        return (self.k(x).view(n, self.heads, self.d_kv).transpose(0, 1),
                self.v(x).view(n, self.heads, self.d_kv).transpose(0, 1))  # fmt: skip


class T5Block(nn.Module):
    def __init__(self, cfg, decoder: bool, first: bool) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        parts: list[nn.Module] = [_Sub("SelfAttention", T5Attention(cfg, first, decoder), cfg.d_model, eps)]
        if decoder:
            parts.append(_Sub("EncDecAttention", T5Attention(cfg, False, decoder, cross=True), cfg.d_model, eps))
        parts.append(_Sub("DenseReluDense", T5FeedForward(cfg), cfg.d_model, eps))
        self.layer = nn.ModuleList(parts)


class _Sub(nn.Module):
    """One pre-norm sub-layer, named as in the checkpoints: layer.N.<name> and layer.N.layer_norm."""

    def __init__(self, name: str, module: nn.Module, d_model: int, eps: float) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, module)
        self.layer_norm = RMSNorm(d_model, eps)

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.name)


class T5FeedForward(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.gated = bool(cfg.is_gated_act)
        if self.gated:
            self.wi_0, self.wi_1 = ReplicatedLinear(cfg.d_model, cfg.d_ff), ReplicatedLinear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = ReplicatedLinear(cfg.d_model, cfg.d_ff)
        self.wo = ReplicatedLinear(cfg.d_ff, cfg.d_model)
        self.act = get_activation(cfg.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class T5Stack(nn.Module):
    def __init__(self, cfg, decoder: bool) -> None:
        super().__init__()
        layers = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList([T5Block(cfg, decoder, i == 0) for i in range(layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        if decoder:  # self-attention through the paged cache, with the relative buckets as a position bias
            for block in self.block:
                a = block.layer[0].inner
                a.attn = Attention(a.heads, a.heads, a.d_kv, scale=1.0, position_bias=self.bias.forward)

    @property
    def bias(self) -> RelativePositionBias:
        return self.block[0].layer[0].inner.relative_attention_bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """One request's embedded encoder input [n, d_model] -> its final hidden states, attending both ways."""
        n = x.shape[0]
        pos = torch.arange(n, device=x.device)
        bias = self.bias(pos[None, :] - pos[:, None])  # [H, n, n]
        for block in self.block:
            sub = block.layer[0]
            a, h = sub.inner, sub.layer_norm(x)
            q = a.q(h).view(n, a.heads, a.d_kv)
            x = x + a.o(_attend(q, *a.kv(h), bias).reshape(n, -1))
            x = x + block.layer[1].inner(block.layer[1].layer_norm(x))
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(CausalLM):
    """The encoder runs in the step where a request's decoder starts at position 0 (admitted, or recomputed after
    preemption); `begin_step(step)` hands the model the step's sequences (request ids, encoder inputs, releases)
    before the forward pass. RMSNorm without mean or bias; ReLU or gated-GELU feed-forward; the decoder output scaled
    by d_model^-1/2 where the config says (`scale_decoder_outputs`)."""

    is_encoder_decoder = True
    cuda_graphs = False  # the encoder runs inside the step
    base_prefix = ""
    ignored = re.compile(r"(encoder|decoder)\.embed_tokens\.weight|.*EncDecAttention\.relative_attention_bias.*")

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        if get_parallel_state().world_size > 1:
            raise ValueError("T5 (encoder-decoder) runs on one rank: set the tensor-parallel degree to 1")
        self.config = cfg
        self.shared = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.d_model)
        self.lm_head.weight = self.shared.weight  # untied when the checkpoint holds lm_head.weight (Flan-T5)
        self.tie_word_embeddings = True
        self.scale = cfg.d_model**-0.5 if getattr(cfg, "scale_decoder_outputs", True) else None
        self.cross: dict[str, CrossKV] = {}  # request id -> its encoder output's K/V per decoder layer
        self.rows: list[tuple[int, int, str]] = []  # this step's sequences: (first row, rows, request id)

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        return int(cfg.num_heads), int(cfg.num_heads), int(cfg.d_ff)

    @classmethod
    def context_length(cls, cfg) -> int:
        return int(getattr(cfg, "n_positions", None) or 512)  # relative positions: the length it was trained on

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        def untie_lm_head(stream: Iterable[tuple[str, Weight]]) -> Iterator[tuple[str, Weight]]:
            for name, tensor in stream:
                if name != "lm_head.weight":
                    yield name, tensor
                    continue
                w = self.shared.weight
                self.lm_head.weight = nn.Parameter(materialize(tensor).to(w.device, w.dtype), requires_grad=False)
                self.tie_word_embeddings = False

        super().load_weights(untie_lm_head(weights))

    def begin_step(self, step: StepInput) -> None:
        """Drop released requests' cross K/V, run the encoder of each sequence starting at position 0, and note
        which rows belong to which request."""
        for rid in step.released:
            self.cross.pop(rid, None)
        for rid, ids in step.encoder_inputs:
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.shared.weight.device)
            enc = self.encoder.encode(self.shared(ids_t))
            self.cross[rid] = [block.layer[1].inner.kv(enc) for block in self.decoder.block]
        self.rows = [(row, q_len, rid) for (row, q_len, _, _), rid in zip(step.sequences(), step.seq_ids)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.shared(input_ids)
        t = x.shape[0]
        for i, block in enumerate(self.decoder.block):
            sub = block.layer[0]
            a, h = sub.inner, sub.layer_norm(x)
            q, k, v = (proj(h).view(t, a.heads, a.d_kv) for proj in (a.q, a.k, a.v))
            x = x + a.o(a.attn(q, k, v).reshape(t, -1))
            sub = block.layer[1]
            a, h = sub.inner, sub.layer_norm(x)
            q = a.q(h).view(t, a.heads, a.d_kv)
            o = torch.empty_like(q)
            for row, n, rid in self.rows:  # each sequence over its own encoder output
                o[row : row + n] = _attend(q[row : row + n], *self.cross[rid][i], None)
            x = x + a.o(o.reshape(t, -1))
            x = x + block.layer[2].inner(block.layer[2].layer_norm(x))
        x = self.decoder.final_layer_norm(x)
        return x if self.scale is None else x * self.scale
