"""The attention-backend seam. A backend owns its KV-cache layout (shapes, dtype), the metadata it builds from a
step's StepInput, the KV write, and attention over a mixed step: decode rows and prefill chunks, with or without a
cached prefix. The execution plan picks one backend at start-up; every Attention layer is handed it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from engine.step_input import StepInput

if TYPE_CHECKING:
    from engine.layers.attention import Attention

_metadata: Any = None


def current_metadata() -> Any:
    """The metadata of the forward pass in progress (None outside attention_metadata())."""
    return _metadata


@contextmanager
def attention_metadata(meta: Any) -> Iterator[None]:
    """Make `meta` the metadata every Attention layer reads during one forward pass."""
    global _metadata
    _metadata = meta
    try:
        yield
    finally:
        _metadata = None


class StepTensors(NamedTuple):
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    sample_rows: torch.Tensor | None  # [N] rows whose logits are computed; None: every row, in order
    meta: Any  # the backend's metadata


def sample_rows(step: StepInput) -> list[int] | None:
    """The step's sampling rows, or None when they are every row in order (decode-only steps)."""
    return None if step.sample_rows == list(range(step.num_tokens)) else step.sample_rows


class AttentionBackend(abc.ABC):
    name: ClassVar[str]
    # Layer options this backend computes itself (sliding_window, logit_softcap, alibi); see layers/attention.py.
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int) -> None:
        self.device, self.dtype, self.block_size = device, dtype, block_size

    def bind(self, num_kv_heads: int, general: bool) -> None:
        """Called once the model is built: its KV heads per rank, and whether any layer has options."""
        self.num_kv_heads, self.general = num_kv_heads, general

    @abc.abstractmethod
    def cache_shapes(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
        """(K shape, V shape) of one layer's cache."""

    def allocate(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_shape, v_shape = self.cache_shapes(num_blocks, num_kv_heads, head_dim)
        return (
            torch.zeros(k_shape, dtype=self.dtype, device=self.device),
            torch.zeros(v_shape, dtype=self.dtype, device=self.device),
        )

    @abc.abstractmethod
    def build_metadata(self, step: StepInput) -> Any:
        """This backend's metadata for one step, on its device."""

    def step_tensors(self, step: StepInput) -> StepTensors:
        """The step's inputs and this backend's metadata, on the device."""
        ids = torch.tensor(step.input_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(step.positions, dtype=torch.long, device=self.device)
        rows = sample_rows(step)
        index = None if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        return StepTensors(ids, positions, index, self.build_metadata(step))

    @abc.abstractmethod
    def write_kv(self, layer: Attention, k: torch.Tensor, v: torch.Tensor, meta: Any) -> None:
        """Store the step's k/v [T, Hkv, hd] in the layer's cache."""

    @abc.abstractmethod
    def attend(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any) -> torch.Tensor:
        """q [T, H, hd] (k/v: the step's own [T, Hkv, hd], already in the cache) -> [T, H, hd]."""

    def describe(self) -> str:
        return self.name
