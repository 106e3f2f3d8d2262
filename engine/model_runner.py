"""ModelRunner: builds one rank's model shard, sizes and binds its paged KV cache, and runs one step.

A step is one flattened batch: decode rows first, then prefill chunks. Rank 0 builds its inputs as
plain lists (`StepInput`, what the other ranks receive); each rank moves them to its device once.
Logits are computed only for the rows that sample; rank 0 hands them to the engine, which samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.device import cpu_threads, rank_device, resolve_dtype
from engine.layers import cpu_decode_kernel, cpu_fused_ops, cpu_gemm
from engine.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_metadata
from engine.loader import iter_weights
from engine.model_source import ModelFiles
from engine.models import get_model_class
from engine.parallel import SINGLE_RANK, ParallelState, building_with
from engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass
class StepInput:
    """One step's model inputs as plain lists: what rank 0 sends every other rank."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # cache slot (block * block_size + offset) of each token
    decode_tables: list[list[int]] = field(default_factory=list)  # block table of each decode row
    decode_lens: list[int] = field(default_factory=list)  # tokens each decode row attends over
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # (row, start, end, table)
    sample_rows: list[int] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        files: ModelFiles,
        hf_config,
        max_model_len: int,
        parallel: ParallelState = SINGLE_RANK,
    ) -> None:
        self.config, self.parallel = config, parallel
        self.device = rank_device(config.device, parallel.rank, parallel.world_size)
        self.dtype = resolve_dtype(config.dtype, self.device)
        threads = cpu_threads(config.num_threads, parallel.world_size)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.send_step: Callable[[StepInput], None] | None = None  # rank 0 of several: hands each step on
        self.block_size = config.block_size or (16 if self.device.type == "cuda" else 32)
        self.max_model_len = max_model_len
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device, building_with(parallel):
                model = get_model_class(hf_config)(hf_config, max_position=max_model_len)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(iter_weights(files, hf_config))
        model.pack_for_cpu(gemm_kernel=cpu_gemm.preferred(config.cpu_gemm))  # bf16: the GEMM kernel or oneDNN
        # CPU: norms, activations, rotary and greedy picks as compiled passes where they build here.
        self.fused_ops = config.cpu_fused_ops and cpu_fused_ops.supports(self.device, self.dtype)
        if self.fused_ops:
            model.use_fused_cpu_ops()
        self.model = model.eval()
        # CPU decodes read the paged cache in place with a compiled kernel when one builds here.
        self.decode_kernel = config.cpu_decode_kernel and cpu_decode_kernel.supports(self.device, self.dtype)
        self.paired = False  # the paired cache layout, whose kernel runs every row (decode and prefill)
        self.num_blocks = self._allocate_kv_cache(hf_config)
        # CPU bf16 with every compiled path above: the decoder layers run as one compiled call per step.
        self.decoder_stack = self.paired and self.fused_ops and config.cpu_decoder_stack and model.use_decoder_stack()

    def _allocate_kv_cache(self, hf_config) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        bytes_per_block = 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize
        cfg = self.config
        if cfg.max_batch_total_tokens is not None:
            num_blocks = math.ceil(cfg.max_batch_total_tokens / self.block_size)
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * cfg.gpu_memory_utilization - used - self._activation_bytes(hf_config)
            num_blocks = int(budget // bytes_per_block)
        else:
            # Never more than every running sequence at full context could use.
            useful = math.ceil(cfg.max_num_seqs * self.max_model_len / self.block_size)
            num_blocks = min(int(cfg.cpu_kv_cache_bytes // bytes_per_block), useful)
        num_blocks = self.parallel.min_over_ranks(num_blocks, self.device)  # every rank holds the same blocks
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV-cache block; lower the model size or raise the budget")
        self.paired = self.decode_kernel and cpu_decode_kernel.supports_paired(
            self.device, self.dtype, a.head_dim, self.block_size
        )
        k_shape, v_shape = Attention.cache_shapes(num_blocks, a.num_kv_heads, self.block_size, a.head_dim, self.paired)
        self.num_kv_heads = a.num_kv_heads
        for layer in layers:
            layer.k_cache = torch.zeros(k_shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(v_shape, dtype=self.dtype, device=self.device)
            layer.paired = self.paired
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB%s)",
            num_blocks,
            self.block_size,
            num_blocks * bytes_per_block / 2**20,
            ", paired layout" if self.paired else "",
        )
        return num_blocks

    def _activation_bytes(self, hf_config) -> int:
        """Rough peak of one prefill step: a few [tokens, max(hidden, intermediate)] buffers + logits."""
        width = max(hf_config.hidden_size, hf_config.intermediate_size)
        tokens = self.config.max_batch_prefill_tokens
        return 8 * tokens * width * self.dtype.itemsize + self.config.max_num_seqs * hf_config.vocab_size * 4

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """The step's model inputs as plain lists: decode rows first, then prefill chunks."""
        step = StepInput()
        ids, positions, slots, bs = step.input_ids, step.positions, step.slots, self.block_size
        for item in batch.decodes:
            seq, p = item.seq, item.start
            ids.append(seq.token_at(p))
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            step.sample_rows.append(len(ids) - 1)
            step.decode_tables.append(seq.block_table)
            step.decode_lens.append(p + 1)
        for item in batch.prefills:
            seq, start, end = item.seq, item.start, item.end
            step.prefills.append((len(ids), start, end, seq.block_table[: -(-end // bs)]))
            ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            if item.sample:
                step.sample_rows.append(len(ids) - 1)
        return step

    def tensors(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """-> input_ids [T], positions [T], attention metadata, on this rank's device."""
        dev, bs = self.device, self.block_size
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decodes=len(step.decode_tables))
        if self.paired:  # one kernel call per layer: decode rows, then each chunk's rows (its K/V written first)
            chunks = [(start, end, table) for _, start, end, table in step.prefills]
            meta.kernel_rows = cpu_decode_kernel.kernel_rows(step.decode_tables, step.decode_lens, chunks)
        elif step.decode_tables:
            width = max(len(t) for t in step.decode_tables)
            padded = [t + [0] * (width - len(t)) for t in step.decode_tables]
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
            if self.decode_kernel:
                meta.decode_context_lens = torch.tensor(step.decode_lens, dtype=torch.long)
            elif min(step.decode_lens) < width * bs:
                lens = torch.tensor(step.decode_lens, device=dev)
                pad = torch.arange(width * bs, device=dev).unsqueeze(0) >= lens.unsqueeze(1)
                bias = torch.zeros(pad.shape, device=dev).masked_fill_(pad, float("-inf"))
                meta.decode_mask = bias[:, None, None, :]  # [D, 1, 1, L]
        for q_start, start, end, table in [] if self.paired else step.prefills:
            chunk = PrefillChunk(q_start=q_start, q_len=end - start, ctx_len=end)
            if start > 0:  # earlier tokens are in the cache: attend over it with an offset mask
                chunk.block_table = torch.tensor(table, dtype=torch.long, device=dev)
                q_pos = torch.arange(start, end, device=dev).unsqueeze(1)
                chunk.mask = torch.arange(end, device=dev).unsqueeze(0) <= q_pos  # [q_len, ctx_len]
            meta.prefills.append(chunk)
        # Cache rows of (token, kv head): ((block * Hkv + h) * block_size + offset), [T * Hkv].
        slot = torch.tensor(step.slots, dtype=torch.long, device=dev)
        if self.fused_ops:  # the compiled write takes the flat slots; the rows below are the torch write's
            meta.fused_slots = slot
        else:
            heads = torch.arange(self.num_kv_heads, device=dev) * bs
            meta.slot_mapping = ((slot // bs * self.num_kv_heads * bs + slot % bs).unsqueeze(1) + heads).view(-1)
            meta.key_slots = (meta.slot_mapping // bs, meta.slot_mapping % bs)
        input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(step.positions, dtype=torch.long, device=dev)
        return input_ids, pos, meta

    def execute(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Run one step (rank 0) -> logits [sampling rows, V] in batch order, or None when no row samples."""
        step = self.prepare(batch)
        if self.send_step is not None:  # the other ranks run the same step
            self.send_step(step)
        return self.run(step)

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor | None:
        """Forward pass and the logits of the sampling rows (every rank computes them: the LM head gathers).
        float32, or the model's dtype where the fused CPU greedy pick reads 16-bit logits as they are."""
        input_ids, positions, meta = self.tensors(step)
        with attention_metadata(meta):
            hidden = self.model(input_ids, positions)
        if not step.sample_rows:
            return None
        rows = torch.tensor(step.sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows), keep_dtype=self.fused_ops)
