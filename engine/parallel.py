"""Tensor-parallel state: this rank, the world size, the process group, and the collectives layers use.

Layers take the state current while the model is built (`building_with`) and keep it, so a single-rank
engine never pays for a collective and two engines in one process never see each other's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: Any = field(default=None, compare=False, repr=False)  # torch ProcessGroup; None: single rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's shard of the last dimension, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (e.g. KV blocks: every rank must allocate the same count)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE_RANK = ParallelState()
_building = SINGLE_RANK


@contextmanager
def building_with(state: ParallelState) -> Iterator[None]:
    """Make `state` the one layers built inside this block shard for."""
    global _building
    previous, _building = _building, state
    try:
        yield
    finally:
        _building = previous


def get_parallel_state() -> ParallelState:
    return _building


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel degree ({denominator})")
    return numerator // denominator
