"""T5's learned relative-position bias: key - query distances fall into log-spaced buckets (exact up to half the
buckets, logarithmic up to `max_distance`, then clamped), each bucket holding one bias per head. Bidirectional
(encoder) buckets split the range by the distance's sign; causal (decoder) ones count only keys before the query."""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_buckets(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """rel = key position - query position (int64, any shape) -> bucket ids in [0, num_buckets)."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        distance = rel.abs()
    else:
        distance = (-rel).clamp(min=0)
    exact = num_buckets // 2
    # float32 log, truncated, as transformers computes it (so the boundary distances land in the same bucket)
    large = (
        exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads), requires_grad=False)

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        """rel [q, n] (key - query positions) -> bias [H, q, n] in the weight's dtype."""
        buckets = relative_buckets(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.weight[buckets].permute(2, 0, 1)
