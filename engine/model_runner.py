"""ModelRunner: builds the model, sizes and binds the paged KV cache, and runs one scheduled step.

A step is one flattened batch: decode rows first, then prefill chunks. Inputs are built in Python
lists and moved once; logits are computed only for the rows that sample.
"""

from __future__ import annotations

import logging
import math

import torch

from engine.config import EngineConfig
from engine.layers import cpu_decode_kernel
from engine.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_metadata
from engine.loader import iter_weights
from engine.model_source import ModelFiles
from engine.models import get_model_class
from engine.sampler import SampleOutput, Sampler, SamplingRequest
from engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, files: ModelFiles, hf_config, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.block_size = config.block_size or (16 if self.device.type == "cuda" else 64)
        self.max_model_len = max_model_len
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with self.device:
                model = get_model_class(hf_config)(hf_config, max_position=max_model_len)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(iter_weights(files, hf_config))
        model.pack_for_cpu()
        self.model = model.eval()
        self.sampler = Sampler()
        self.num_blocks = self._allocate_kv_cache(hf_config)
        # CPU decodes read the paged cache in place with a compiled kernel when one builds here.
        cache = self.model.attention_layers()[0].k_cache
        self.decode_kernel = config.cpu_decode_kernel and cpu_decode_kernel.supports(cache, cache)

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
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV-cache block; lower the model size or raise the budget")
        k_shape, v_shape = Attention.cache_shapes(num_blocks, a.num_kv_heads, self.block_size, a.head_dim)
        self.num_kv_heads = a.num_kv_heads
        for layer in layers:
            layer.k_cache = torch.zeros(k_shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(v_shape, dtype=self.dtype, device=self.device)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            self.block_size,
            num_blocks * bytes_per_block / 2**20,
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

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """-> input_ids [T], positions [T], attention metadata, rows of the batch that sample."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        dev, bs = self.device, self.block_size
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for item in batch.decodes:
            seq, p = item.seq, item.start
            ids.append(seq.token_at(p))
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            sample_rows.append(len(ids) - 1)
            decode_tables.append(seq.block_table)
            decode_lens.append(p + 1)
        meta = AttentionMetadata(slot_mapping=torch.empty(0), num_decodes=len(batch.decodes))
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
            if self.decode_kernel:
                meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long)
            elif min(decode_lens) < width * bs:
                lens = torch.tensor(decode_lens, device=dev)
                pad = torch.arange(width * bs, device=dev).unsqueeze(0) >= lens.unsqueeze(1)
                bias = torch.zeros(pad.shape, device=dev).masked_fill_(pad, float("-inf"))
                meta.decode_mask = bias[:, None, None, :]  # [D, 1, 1, L]
        for item in batch.prefills:
            seq, start, end = item.seq, item.start, item.end
            chunk = PrefillChunk(q_start=len(ids), q_len=end - start, ctx_len=end)
            if start > 0:  # earlier tokens are in the cache: attend over it with an offset mask
                n_blocks = -(-end // bs)
                chunk.block_table = torch.tensor(seq.block_table[:n_blocks], dtype=torch.long, device=dev)
                q_pos = torch.arange(start, end, device=dev).unsqueeze(1)
                chunk.mask = torch.arange(end, device=dev).unsqueeze(0) <= q_pos  # [q_len, ctx_len]
            meta.prefills.append(chunk)
            ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            if item.sample:
                sample_rows.append(len(ids) - 1)
        # Cache rows of (token, kv head): ((block * Hkv + h) * block_size + offset), [T * Hkv].
        slot = torch.tensor(slots, dtype=torch.long, device=dev)
        heads = torch.arange(self.num_kv_heads, device=dev) * bs
        meta.slot_mapping = ((slot // bs * self.num_kv_heads * bs + slot % bs).unsqueeze(1) + heads).view(-1)
        meta.key_slots = (meta.slot_mapping // bs, meta.slot_mapping % bs)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return input_ids, pos, meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, requests: list[SamplingRequest]) -> list[SampleOutput]:
        """Run one step; `requests` are the sampling rows' parameters, in batch order."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        with attention_metadata(meta):
            hidden = self.model(input_ids, positions)
        if not sample_rows:
            return []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return self.sampler(logits, requests)
