"""The compiled CPU backends, built on the torch twin they are tested against.

`cpu` (plain layout): decode rows run csrc/paged_decode.c over the cache in place, prefill chunks run SDPA as the twin
does. `cpu_paired` (bf16, even head_dim and block size): K `[num_blocks, Hkv, head_dim/2, block_size, 2]`,
V `[num_blocks, Hkv, block_size/2, head_dim, 2]`, and csrc/paired_attention.c runs every row of a step, decodes and
prefill chunks, in one call per layer. With the fused ops both write K/V with one compiled pass. Layers with options
(window, soft-cap, ALiBi) take the twin's general path over the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.torch_twin import TorchBackend, TwinMetadata
from engine.layers import cpu_attention_kernels
from engine.layers.attention import Attention
from engine.step_input import StepInput


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int, fused_write: bool) -> None:
        super().__init__(device, dtype, block_size)
        self.compiled_write = fused_write

    def describe(self) -> str:
        return f"{self.name}{'+fused_write' if self.compiled_write else ''}"

    def _decode_metadata(self, step: StepInput, meta: TwinMetadata) -> None:
        if not step.decode_tables:
            return
        width = max(len(t) for t in step.decode_tables)
        padded = [t + [0] * (width - len(t)) for t in step.decode_tables]
        meta.decode_block_tables = torch.tensor(padded, dtype=torch.long)
        meta.decode_context_lens = torch.tensor(step.decode_lens, dtype=torch.long)

    def _decode(self, layer: Attention, q: torch.Tensor, meta: TwinMetadata) -> torch.Tensor:
        return cpu_attention_kernels.paged_decode(
            q, layer.k_cache, layer.v_cache, meta.decode_block_tables, meta.decode_context_lens, layer.scale
        )


@dataclass
class PairedMetadata(TwinMetadata):
    kernel_rows: cpu_attention_kernels.KernelRows | None = None  # every row of the step in one kernel call


class CpuPairedBackend(TorchBackend):
    name = "cpu_paired"
    paired = True

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int, fused_write: bool) -> None:
        super().__init__(device, dtype, block_size)
        self.compiled_write = fused_write

    def describe(self) -> str:
        return f"{self.name}{'+fused_write' if self.compiled_write else ''}"

    def cache_shapes(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
        n, h, bs, hd = num_blocks, num_kv_heads, self.block_size, head_dim
        return (n, h, hd // 2, bs, 2), (n, h, bs // 2, hd, 2)

    def build_metadata(self, step: StepInput) -> PairedMetadata:
        meta = PairedMetadata(num_decodes=len(step.decode_tables))
        self._slot_metadata(step, meta)
        # One kernel call per layer: decode rows, then each chunk's rows (its K/V written first).
        chunks = [(start, end, table) for _, start, end, table in step.prefills]
        meta.kernel_rows = cpu_attention_kernels.kernel_rows(step.decode_tables, step.decode_lens, chunks)
        if self.general:
            meta.sequences = self._sequences(step)
        return meta

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PairedMetadata
    ) -> torch.Tensor:
        if layer.has_options:
            return self._general(layer, q, meta)
        return cpu_attention_kernels.paired_attention(q, layer.k_cache, layer.v_cache, meta.kernel_rows, layer.scale)
