"""Paged attention in pure torch (SDPA): write the step's K/V into cache slots, then attend.

The KV cache of one layer is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and for V.
Decodes (one query each) are batched over their gathered, padded block tables; prefill chunks run one
SDPA call each, causal over fresh K/V, or masked over the cache when earlier tokens are cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    q_start: int  # row of the chunk's first token in the flattened batch
    q_len: int
    ctx_len: int  # the chunk covers positions [ctx_len - q_len, ctx_len)
    block_table: torch.Tensor | None = None  # [num_blocks] when earlier tokens are in the cache
    mask: torch.Tensor | None = None  # [q_len, ctx_len] bool (True = attend) with block_table


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each token in the batch
    num_decodes: int = 0  # the first num_decodes rows are single-token decodes
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] bool, or None
    prefills: list[PrefillChunk] = field(default_factory=list)


_metadata: AttentionMetadata | None = None


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
        # Bound by the model runner once the cache is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        meta = _metadata
        if meta is None:
            raise RuntimeError("Attention called outside attention_metadata()")
        kc, vc = self.k_cache, self.v_cache
        kc.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        vc.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
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
                ks, vs, mask = k[rows], v[rows], None
            else:
                ks = kc[p.block_table].flatten(0, 1)[: p.ctx_len]
                vs = vc[p.block_table].flatten(0, 1)[: p.ctx_len]
                mask = p.mask
            o = F.scaled_dot_product_attention(
                qs,
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
                enable_gqa=self.gqa,
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [D, H, hd] attends over each sequence's cached tokens -> [D, H, hd]."""
        bt = meta.decode_block_tables
        ks = kc[bt].flatten(1, 2).transpose(1, 2)  # [D, Hkv, L, hd]
        vs = vc[bt].flatten(1, 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), ks, vs, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=self.gqa
        )
        return o.squeeze(2)
