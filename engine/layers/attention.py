"""Paged attention: write the step's K/V into cache slots, then attend (compiled CPU kernels or torch/SDPA).

The plain KV cache of one layer: V `[num_blocks, Hkv, block_size, head_dim]`, K transposed per block
`[num_blocks, Hkv, head_dim, block_size]` (q.K then runs across tokens: plain matmuls, no transposes).
The paired layout (bf16 on CPU, where csrc/paired_attention.c runs every row of a step, decodes and prefill chunks,
in one call): K `[num_blocks, Hkv, head_dim/2, block_size, 2]`, V `[num_blocks, Hkv, block_size/2, head_dim, 2]`.
Otherwise decodes use the plain-layout CPU kernel where it builds, else batched matmuls over gathered block tables;
prefill chunks run one SDPA call each, causal over fresh K/V, or masked over the cache when tokens are cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import cpu_decode_kernel, cpu_fused_ops


@dataclass
class PrefillChunk:
    q_start: int  # row of the chunk's first token in the flattened batch
    q_len: int
    ctx_len: int  # the chunk covers positions [ctx_len - q_len, ctx_len)
    block_table: torch.Tensor | None = None  # [num_blocks] when earlier tokens are in the cache
    mask: torch.Tensor | None = None  # [q_len, ctx_len] bool (True = attend) with block_table


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T * Hkv] row of each (token, kv head) in V viewed as [-1, head_dim]
    key_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # slot_mapping // block_size, % block_size
    num_decodes: int = 0  # the first num_decodes rows are single-token decodes
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] float 0/-inf, or None
    decode_context_lens: torch.Tensor | None = None  # [D] int64: set when the CPU decode kernel runs decodes
    prefills: list[PrefillChunk] = field(default_factory=list)
    kernel_rows: cpu_decode_kernel.KernelRows | None = None  # paired cache: every row of the step in one kernel call
    value_pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # paired cache: key_slots[1] // 2, % 2
    fused_slots: torch.Tensor | None = None  # [T] int64 block * block_size + offset: the compiled write runs


_metadata: AttentionMetadata | None = None


def pair(x: torch.Tensor) -> torch.Tensor:
    """[..., A, B] -> [..., A/2, B, 2]: rows 2i and 2i + 1 interleaved (plain cache blocks -> paired ones)."""
    return x.unflatten(-2, (x.shape[-2] // 2, 2)).transpose(-1, -2)


def unpair(x: torch.Tensor) -> torch.Tensor:
    """[..., A/2, B, 2] -> [..., A, B], the inverse of pair()."""
    return x.transpose(-1, -2).flatten(-3, -2)


def current_metadata() -> AttentionMetadata | None:
    """The metadata of the forward pass in progress (None outside attention_metadata())."""
    return _metadata


@contextmanager
def attention_metadata(meta: AttentionMetadata) -> Iterator[None]:
    """Make `meta` the metadata every Attention layer reads during one forward pass."""
    global _metadata
    _metadata = meta
    try:
        yield
    finally:
        _metadata = None


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.gqa = num_heads != num_kv_heads
        # Bound by the model runner once the cache is allocated; `paired`: the cache has the paired layout.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.paired = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        meta = _metadata
        if meta is None:
            raise RuntimeError("Attention called outside attention_metadata()")
        kc, vc = self.k_cache, self.v_cache
        self._write(kc, vc, k, v, meta)
        if meta.kernel_rows is not None:
            return cpu_decode_kernel.paired_attention(q, kc, vc, meta.kernel_rows, self.scale)
        if meta.num_decodes and not meta.prefills:
            return self._decode(q, kc, vc, meta)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            out[:n] = self._decode(q[:n], kc, vc, meta)
        for p in meta.prefills:
            rows = slice(p.q_start, p.q_start + p.q_len)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
            if p.block_table is None:
                ks, vs, mask = k[rows].transpose(0, 1), v[rows].transpose(0, 1), None
            else:
                blocks = self._plain(kc.index_select(0, p.block_table))  # [n, Hkv, hd, bs] -> [Hkv, n * bs, hd]
                ks = blocks.permute(1, 0, 3, 2).reshape(self.num_kv_heads, -1, self.head_dim)[:, : p.ctx_len]
                vs, mask = self._gather(vc, p), p.mask
            o = F.scaled_dot_product_attention(
                qs,
                ks.unsqueeze(0),
                vs.unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=self.gqa,
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out

    @staticmethod
    def cache_shapes(
        num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int, paired: bool = False
    ) -> tuple[tuple, tuple]:
        """(K shape, V shape) of one layer's cache; `paired` needs an even head_dim and block_size."""
        n, h, bs, hd = num_blocks, num_kv_heads, block_size, head_dim
        if paired:
            return (n, h, hd // 2, bs, 2), (n, h, bs // 2, hd, 2)
        return (n, h, hd, bs), (n, h, bs, hd)

    def _write(
        self, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Store the step's k/v [T, Hkv, hd] in their cache slots (key_slots: block row, offset of each [T * Hkv])."""
        if meta.fused_slots is not None:
            cpu_fused_ops.cache_kv_(k, v, meta.fused_slots, kc, vc, self.paired)
            return
        hd = self.head_dim
        block_rows, offsets = meta.key_slots
        if not self.paired:
            kc.view(-1, hd, kc.shape[-1])[block_rows, :, offsets] = k.reshape(-1, hd)
            vc.view(-1, hd).index_copy_(0, meta.slot_mapping, v.reshape(-1, hd))
            return
        if meta.value_pairs is None:
            meta.value_pairs = (offsets // 2, offsets % 2)
        pair_rows, halves = meta.value_pairs  # V token t sits in pair row t // 2, half t % 2
        words = kc.view(torch.int32).view(-1, hd // 2, kc.shape[3])  # 16-bit K: a pair of dims is one 32-bit word,
        words[block_rows, :, offsets] = k.reshape(-1, hd).view(torch.int32)  # so it is written as a plain K
        vc.view(-1, vc.shape[2], hd, 2)[block_rows, pair_rows, :, halves] = v.reshape(-1, hd)

    def _plain(self, blocks: torch.Tensor) -> torch.Tensor:
        """Gathered cache blocks in the plain layout: K [..., hd, bs], V [..., bs, hd] (a view when not paired)."""
        return unpair(blocks) if self.paired else blocks

    def _gather(self, cache: torch.Tensor, p: PrefillChunk) -> torch.Tensor:
        """A chunk's cached V as [Hkv, ctx_len, hd]."""
        blocks = self._plain(cache.index_select(0, p.block_table))  # [n, Hkv, bs, hd]
        return blocks.transpose(0, 1).flatten(1, 2)[:, : p.ctx_len]

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [D, H, hd] attends over each sequence's cached tokens -> [D, H, hd].

        Batched matmuls block by block over the gathered blocks, never copying K/V into a
        contiguous [D, Hkv, L, hd] layout: for one query per sequence this is several times
        faster than SDPA's CPU kernel. Query heads are grouped per KV head: [D, Hkv, G, hd].
        """
        bt = meta.decode_block_tables  # [D, M]
        if meta.decode_context_lens is not None:
            return cpu_decode_kernel.paged_decode(q, kc, vc, bt, meta.decode_context_lens, self.scale)
        d, m = bt.shape
        hkv, bs, hd = self.num_kv_heads, kc.shape[3], self.head_dim  # tokens are dim 3 in either layout
        ks = self._plain(kc.index_select(0, bt.view(-1))).reshape(d, m, hkv, hd, bs)
        vs = self._plain(vc.index_select(0, bt.view(-1))).reshape(d, m, hkv, bs, hd)
        qg = q.view(d, 1, hkv, -1, hd)
        g = qg.shape[3]
        scores = torch.matmul(qg, ks)  # [D, M, Hkv, G, bs]
        scores = scores.permute(0, 2, 3, 1, 4).reshape(d, hkv, g, m * bs).float() * self.scale
        if meta.decode_mask is not None:
            scores = scores + meta.decode_mask  # additive 0 / -inf: [D, 1, 1, M * bs]
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(d, hkv, g, m, bs).permute(0, 3, 1, 2, 4)
        out = torch.matmul(probs, vs).sum(1)  # [D, M, Hkv, G, hd] -> [D, Hkv, G, hd]
        return out.view(d, self.num_heads, hd)
