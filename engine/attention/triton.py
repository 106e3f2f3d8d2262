"""The GPU backend: Triton paged attention reading K/V in place through block tables (triton_kernels.py).

Cache layout of one layer, K and V alike: `[num_blocks, block_size, Hkv, head_dim]`. A step's integer inputs
(token ids, positions, slots, sample rows, sequence lengths, query offsets, block tables) travel to the device in one
pinned int32 copy and are used as views of it. Decode-only steps can run from static buffers of the same layout
(`GraphBuffers`), so the CUDA graph runner replays them with one copy and no allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.base import AttentionBackend, StepTensors, sample_rows
from engine.attention.triton_config import choose_num_kv_splits
from engine.attention.triton_kernels import paged_attention, write_kv
from engine.layers.attention import Attention
from engine.plan import BACKEND_OPTIONS
from engine.step_input import StepInput


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] int32, -1: a padding row (nothing written)
    block_tables: torch.Tensor  # [S, M] int32 (rows may be strided)
    seq_lens: torch.Tensor  # [S] int32: tokens of sequence s after this step; 0: padding
    query_start_loc: torch.Tensor  # [S + 1] int32
    max_query_len: int
    num_kv_splits: int = 1  # decode-only steps of few, long sequences split each sequence's keys


@dataclass
class GraphBuffers:
    """Static decode inputs for CUDA graphs. For a batch of b rows the first b * (4 + M) int32 of one device buffer
    hold ids [b] | positions [b] | slots [b] | lengths [b] | block tables [b, M]: each bucket's graph reads its own
    overlay, and a step is one copy of exactly that prefix from a pinned twin. Query offsets are a constant arange."""

    host: torch.Tensor  # pinned [B * (4 + M)]
    device: torch.Tensor  # [B * (4 + M)]
    query_start_loc: torch.Tensor  # [B + 1] = 0..B
    max_blocks: int

    @staticmethod
    def regions(flat: torch.Tensor, batch: int, max_blocks: int) -> list[torch.Tensor]:
        """ids, positions, slots, lengths [batch] and tables [batch, M] as views of `flat`."""
        parts = [flat[i * batch : (i + 1) * batch] for i in range(4)]
        return [*parts, flat[4 * batch : batch * (4 + max_blocks)].view(batch, max_blocks)]

    def views(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, TritonMetadata]:
        ids, positions, slots, lens, tables = self.regions(self.device, batch, self.max_blocks)
        return ids, positions, TritonMetadata(slots, tables, lens, self.query_start_loc[: batch + 1], 1)


class TritonBackend(AttentionBackend):
    name = "triton"
    options = BACKEND_OPTIONS["triton"]

    def __init__(self, device: torch.device, dtype: torch.dtype, block_size: int) -> None:
        super().__init__(device, dtype, block_size)
        self._pinned = device.type == "cuda"
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._pinned else 1

    def cache_shapes(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        return shape, shape

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(host)
        if self._pinned:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def step_tensors(self, step: StepInput) -> StepTensors:
        seqs = step.sequences()
        t, s = step.num_tokens, len(seqs)
        rows = sample_rows(step) or []
        width = max((len(table) for *_, table in seqs), default=0)
        # One int32 host array: ids, positions, slots [T] | sample rows [N] | seq_lens [S] | query_start_loc [S + 1]
        # | tables [S, M].
        n = len(rows)
        host = np.zeros(3 * t + n + 2 * s + 1 + s * width, dtype=np.int32)
        host[:t], host[t : 2 * t], host[2 * t : 3 * t] = step.input_ids, step.positions, step.slots
        host[3 * t : 3 * t + n] = rows
        o = 3 * t + n
        host[o : o + s] = [n for _, _, n, _ in seqs]
        host[o + s + 1 : o + 2 * s + 1] = np.cumsum([q for _, q, _, _ in seqs])
        tables = host[o + 2 * s + 1 :].reshape(s, width)
        for i, (*_, table) in enumerate(seqs):
            tables[i, : len(table)] = table
        dev = self._to_device(host)
        meta = TritonMetadata(
            slot_mapping=dev[2 * t : 3 * t],
            block_tables=dev[o + 2 * s + 1 :].view(s, width),
            seq_lens=dev[o : o + s],
            query_start_loc=dev[o + s : o + 2 * s + 1],
            max_query_len=max((q for _, q, _, _ in seqs), default=0),
        )
        if step.is_decode_only:
            meta.num_kv_splits = choose_num_kv_splits(s, self.num_kv_heads, max(step.decode_lens), self._num_sms)
        index = dev[3 * t : 3 * t + n] if n else None
        return StepTensors(dev[:t], dev[t : 2 * t], index, meta)

    def build_metadata(self, step: StepInput) -> TritonMetadata:
        return self.step_tensors(step).meta

    # ---- CUDA graphs ------------------------------------------------------------------------

    def graph_buffers(self, max_batch: int, max_blocks: int) -> GraphBuffers:
        size = max_batch * (4 + max_blocks)
        host = torch.zeros(size, dtype=torch.int32, pin_memory=self._pinned)
        device = torch.zeros(size, dtype=torch.int32, device=self.device)
        qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=self.device)
        return GraphBuffers(host, device, qsl, max_blocks)

    def fill_graph_buffers(self, buffers: GraphBuffers, step: StepInput, batch: int) -> None:
        """Decode rows of `step`, then padding rows up to `batch` (length 0, slot -1): one host->device copy.
        Rewriting the pinned buffer is safe: the previous decode step's copy is done. On rank 0 the sampler's
        device->host copy waited for it; another rank gets the next step only after rank 0 sampled, whose logits
        needed this rank's collectives of that step, which its stream ran after the copy."""
        n, size = len(step.decode_tables), batch * (4 + buffers.max_blocks)
        ids, positions, slots, lens, tables = (
            r.numpy() for r in buffers.regions(buffers.host, batch, buffers.max_blocks)
        )
        ids[:n], positions[:n], slots[:n], lens[:n] = step.input_ids, step.positions, step.slots, step.decode_lens
        ids[n:], positions[n:], slots[n:], lens[n:] = 0, 0, -1, 0
        for i, table in enumerate(step.decode_tables):
            tables[i, : len(table)] = table
        buffers.device[:size].copy_(buffers.host[:size], non_blocking=True)

    # ---- write and attend -------------------------------------------------------------------

    def write_kv(self, layer: Attention, k: torch.Tensor, v: torch.Tensor, meta: TritonMetadata) -> None:
        write_kv(k, v, layer.k_cache, layer.v_cache, meta.slot_mapping)

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TritonMetadata
    ) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return paged_attention(
            q, layer.k_cache, layer.v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, layer.scale, sliding_window=layer.sliding_window, softcap=layer.logit_softcap,
            alibi_slopes=layer.alibi_slopes, num_kv_splits=meta.num_kv_splits,
        )  # fmt: skip
