"""A checkpoint tensor not read yet: weight loaders narrow it to their rank's part, then `materialize` reads
only that part (safetensors `get_slice`), so a rank's load touches ~1/N of a sharded weight.

Plain tensors (.bin through mmap, GGUF after dequantization) go through the same calls unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


class TensorSlice:
    """A view of a safetensors `PySafeSlice`: `.shape`, `.dim()`, `.narrow()` like a tensor, read by `load()`."""

    def __init__(self, source: Any, shape: tuple[int, ...] | None = None, starts: tuple[int, ...] | None = None):
        self.source = source
        full = tuple(int(n) for n in source.get_shape())
        self.shape = torch.Size(full if shape is None else shape)
        self.starts = starts if starts is not None else (0,) * len(full)

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> TensorSlice:
        if not (0 <= start and start + length <= self.shape[dim]):
            raise ValueError(f"slice [{start}, {start + length}) is outside dimension {dim} of size {self.shape[dim]}")
        shape, starts = list(self.shape), list(self.starts)
        shape[dim], starts[dim] = length, starts[dim] + start
        return TensorSlice(self.source, tuple(shape), tuple(starts))

    def load(self) -> torch.Tensor:
        index = tuple(slice(s, s + n) for s, n in zip(self.starts, self.shape))
        return self.source[index]


Weight = torch.Tensor | TensorSlice


def materialize(weight: Weight) -> torch.Tensor:
    return weight.load() if isinstance(weight, TensorSlice) else weight


def narrow_clamped(weight: Weight, dim: int, start: int, length: int) -> Weight:
    """`narrow`, cut at the end of the dimension (the padded vocabulary rows of the last rank)."""
    start = min(start, weight.shape[dim])
    return weight.narrow(dim, start, min(length, weight.shape[dim] - start))
