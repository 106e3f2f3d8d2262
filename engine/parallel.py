"""Tensor-parallel state: this process's rank and the world size, and the collectives layers use.

World size is 1 until the tensor-parallel issue lands; layers already slice and reduce through here,
so sharding is a change to this module and the process launcher, not to the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1


_state = ParallelState()


def set_parallel_state(state: ParallelState) -> None:
    global _state
    _state = state


def get_tp_rank() -> int:
    return _state.rank


def get_tp_size() -> int:
    return _state.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.world_size > 1:
        torch.distributed.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's shard of the last dimension, in rank order."""
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel degree ({denominator})")
    return numerator // denominator
