"""ALiBi slopes (BLOOM, Falcon, MPT style): head h's attention bias is slope_h * (key position - query position)."""

from __future__ import annotations

import math

import torch

from engine.parallel import get_parallel_state


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """float32 [num_heads]: a geometric sequence from 2^(-8/n) for the nearest power of two n, the remaining heads
    interleaved from the next power's sequence (as transformers builds them). Built on the CPU whatever device the
    model is built on: Attention.bind moves them to the cache's."""
    with torch.device("cpu"):
        return _slopes(num_heads)


def _slopes(num_heads: int) -> torch.Tensor:
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
    return slopes


def rank_alibi_slopes(num_heads: int) -> torch.Tensor:
    """The slopes of this tensor-parallel rank's query heads (a contiguous 1/N of them)."""
    tp = get_parallel_state()
    local = num_heads // tp.world_size
    return alibi_slopes(num_heads)[tp.rank * local : (tp.rank + 1) * local].float()
