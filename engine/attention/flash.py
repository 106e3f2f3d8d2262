"""flash-attn where it is installed (the GPU image builds it with --build-arg FLASH_ATTN=1): steps made only of fresh
prefill chunks (no decode rows, nothing cached) run `flash_attn_varlen_func` on the step's own K/V; every other step
runs the Triton kernels. Its paged path needs KV blocks of 256 tokens, which would waste the prefix cache's
granularity, so cached prefixes and decodes stay on Triton's paged kernel. The cache layout is Triton's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import StepTensors
from engine.attention.triton import TritonBackend, TritonMetadata
from engine.layers.attention import Attention
from engine.step_input import StepInput


@dataclass
class FlashMetadata(TritonMetadata):
    fresh: bool = False  # every sequence is a prefill chunk starting at position 0


class FlashAttnBackend(TritonBackend):
    name = "flash_attn"

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int) -> None:
        super().__init__(device, dtype, block_size)
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func

    def step_tensors(self, step: StepInput) -> StepTensors:
        t = super().step_tensors(step)
        fresh = not step.decode_tables and all(start == 0 for _, start, _, _ in step.prefills)
        meta = FlashMetadata(**vars(t.meta), fresh=fresh)
        return StepTensors(t.input_ids, t.positions, t.sample_rows, meta)

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TritonMetadata
    ) -> torch.Tensor:
        if not getattr(meta, "fresh", False):
            return super().attend(layer, q, k, v, meta)
        window = (-1, -1) if layer.sliding_window is None else (layer.sliding_window - 1, 0)
        return self._varlen(
            q, k, v, meta.query_start_loc, meta.query_start_loc, meta.max_query_len, meta.max_query_len,
            softmax_scale=layer.scale, causal=True, window_size=window, softcap=layer.logit_softcap or 0.0,
            alibi_slopes=layer.alibi_slopes,
        )  # fmt: skip
