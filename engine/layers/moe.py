"""Mixture-of-experts MLP: softmax top-k routing over E gated experts, run batched per expert.

The step's (token, choice) pairs are sorted by expert, so each expert runs one matmul over its contiguous rows
(a loop over experts, never over tokens); weighted outputs are summed back per token in ascending expert order
(as transformers does). Under tensor parallelism each expert's intermediate dim is split (gate/up by rows, down by
columns) and the partial sums are all-reduced once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.activation import get_activation
from engine.parallel import divide, get_parallel_state
from engine.weight_slice import Weight, materialize

# checkpoint names of an expert's projections -> the part they load
EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (float32 weights [T, k], expert ids [T, k]): softmax, top-k, optionally renormalised."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class FusedMoE(nn.Module):
    """E experts' down(act(gate(x)) * up(x)), weights [E, 2 * I / tp, H] (gate rows, then up rows) and
    [E, H, I / tp]; `float_weights`: scale expert outputs by the float32 routing weights (Mixtral) rather than by
    weights cast to the activations' dtype (Qwen MoE)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        act: str = "silu",
        float_weights: bool = False,
    ) -> None:
        super().__init__()
        self.tp = get_parallel_state()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.float_weights = float_weights
        self.inter = divide(intermediate_size, self.tp.world_size, "expert intermediate size")
        self.act = get_activation(act)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.inter), requires_grad=False)
        for p, parts in ((self.w13, ("gate", "up")), (self.w2, ("down",))):
            p.weight_loader = self.weight_loader  # type: ignore[attr-defined]
            p.shards = [(e, part) for e in range(num_experts) for part in parts]  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Weight, shard: tuple[int, str] | None = None) -> None:
        """One expert's part ((expert, "gate" | "up" | "down"), a [I, H] or [H, I] tensor) or, with no shard, the
        fused tensor of every expert ([E, 2 I, H] gate_up or [E, H, I] down)."""
        rank, n = self.tp.rank, self.inter
        if shard is None:
            if param is self.w13:  # [E, 2I, H]: gate rows then up rows
                full = loaded.shape[1] // 2
                for e in range(self.num_experts):
                    expert = materialize(loaded.narrow(0, e, 1))[0]
                    self.weight_loader(param, expert.narrow(0, 0, full), (e, "gate"))
                    self.weight_loader(param, expert.narrow(0, full, full), (e, "up"))
            else:
                for e in range(self.num_experts):
                    self.weight_loader(param, materialize(loaded.narrow(0, e, 1))[0], (e, "down"))
            return
        expert, part = shard
        if part == "down":
            piece, target = loaded.narrow(1, rank * n, n), param.data[expert]
        else:
            piece = loaded.narrow(0, rank * n, n)
            target = param.data[expert].narrow(0, 0 if part == "gate" else n, n)
        if tuple(piece.shape) != tuple(target.shape):
            raise ValueError(f"expert tensor shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        target.copy_(materialize(piece))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H] (reduced over ranks)."""
        weights, experts = route(router_logits, self.top_k, self.renormalize)
        if not self.float_weights:
            weights = weights.to(x.dtype)
        flat = experts.view(-1)  # [T * k]
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k  # the token of each sorted (token, choice) row
        rows_weight = weights.view(-1)[order].unsqueeze(1)
        xs = x.index_select(0, tokens)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            gate, up = F.linear(xs[rows], self.w13[e]).chunk(2, dim=-1)
            h = F.linear(self.act(gate) * up, self.w2[e]) * rows_weight[rows]
            out.index_add_(0, tokens[rows], h.to(out.dtype))
            start += n
        return self.tp.all_reduce(out) if self.tp.world_size > 1 else out
