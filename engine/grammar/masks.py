"""Filling a step's token bitmasks on CPU threads while the forward pass runs.

`start` hands the constrained rows' matchers to llguidance's executor (its own threads, without the GIL) from a
background thread and returns at once; the engine runs the model, then `rows()` waits. One slow grammar costs its
own row's thread, never the others'; its work per mask is bounded (compiler._LIMITS). If the batched fill raises, each
row is filled alone, so the row that broke it fails alone.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from engine.grammar.compiler import GrammarState


class PendingMasks:
    """A step's masks being filled: bits [G, W] int32 (CPU), one row per constrained request in `start` order."""

    def __init__(self, future: Future[None], bits: torch.Tensor, states: list[GrammarState]) -> None:
        self.future, self.bits, self.states = future, bits, states
        self._errors: list[Exception | None] | None = None

    def wait(self) -> None:
        """Block until filled (idempotent); never raises: per-row errors are kept for `row`."""
        if self._errors is not None:
            return
        try:
            self.future.result()
            self._errors = [None] * len(self.states)
        except Exception:
            self._errors = [_fill_one(s, self.bits[i]) for i, s in enumerate(self.states)]

    def row(self, index: int) -> torch.Tensor:
        """Row `index` [W] int32, after checking its matcher; raises what failed that row (RequestFault or the
        library's error)."""
        self.wait()
        assert self._errors is not None
        error = self._errors[index]
        if error is not None:
            raise error
        self.states[index].check()
        return self.bits[index]


def _fill_one(state: GrammarState, row: torch.Tensor) -> Exception | None:
    try:
        state.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        return None
    except Exception as e:
        return e


class MaskFiller:
    def __init__(self, width: int, device: torch.device, threads: int | None = None) -> None:
        """width: words per row (GrammarCompiler.mask_width); rows are pinned when the logits live on CUDA."""
        self.width = width
        self.pinned = device.type == "cuda"
        self.executor = llguidance.LLExecutor(threads)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

    def start(self, states: list[GrammarState]) -> PendingMasks:
        bits = torch.empty(len(states), self.width, dtype=torch.int32, pin_memory=self.pinned)
        return PendingMasks(self.pool.submit(self._fill, states, bits), bits, states)

    def _fill(self, states: list[GrammarState], bits: torch.Tensor) -> None:
        pairs = [(s.matcher, i) for i, s in enumerate(states)]
        self.executor.unsafe_compute_mask_ptr(pairs, bits.data_ptr(), self.width * 4, len(states))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
