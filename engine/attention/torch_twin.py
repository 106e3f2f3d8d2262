"""The torch twin: paged attention in plain torch ops, exact and slow, on any device. The oracle the compiled CPU
kernels and the Triton kernels are tested against, and the path where none of them runs.

Plain cache layout of one layer: V `[num_blocks, Hkv, block_size, head_dim]`, K transposed per block
`[num_blocks, Hkv, head_dim, block_size]` (q.K runs across tokens: plain matmuls, no transposes). Decode rows run as
batched matmuls block by block over the gathered blocks; prefill chunks as one SDPA call each (causal over fresh K/V,
masked over the cache when tokens are cached). Layers with options (window, soft-cap, ALiBi) take the general path:
explicit scores per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend
from engine.layers import cpu_fused_ops
from engine.layers.attention import Attention
from engine.plan import BACKEND_OPTIONS
from engine.step_input import StepInput


def pair(x: torch.Tensor) -> torch.Tensor:
    """[..., A, B] -> [..., A/2, B, 2]: rows 2i and 2i + 1 interleaved (plain cache blocks -> paired ones)."""
    return x.unflatten(-2, (x.shape[-2] // 2, 2)).transpose(-1, -2)


def unpair(x: torch.Tensor) -> torch.Tensor:
    """[..., A/2, B, 2] -> [..., A, B], the inverse of pair()."""
    return x.transpose(-1, -2).flatten(-3, -2)


@dataclass
class PrefillChunk:
    q_start: int  # row of the chunk's first token in the flattened batch
    q_len: int
    ctx_len: int  # the chunk covers positions [ctx_len - q_len, ctx_len)
    block_table: torch.Tensor | None = None  # [num_blocks] when earlier tokens are in the cache
    mask: torch.Tensor | None = None  # [q_len, ctx_len] bool (True = attend) with block_table


@dataclass
class TwinMetadata:
    num_decodes: int = 0  # the first num_decodes rows are single-token decodes
    slot_mapping: torch.Tensor | None = None  # [T * Hkv] row of each (token, kv head) in V viewed as [-1, head_dim]
    key_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # slot_mapping // block_size, % block_size
    fused_slots: torch.Tensor | None = None  # [T] int64 block * block_size + offset: the compiled CPU write runs
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] float 0/-inf, or None
    decode_context_lens: torch.Tensor | None = None  # [D] int64 (the CPU decode kernel's)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # general path: (first row, query tokens, tokens after the step, block table) of every sequence
    sequences: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)
    value_pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # paired cache: key_slots[1] // 2, % 2


class TorchBackend(AttentionBackend):
    name = "torch"
    options = BACKEND_OPTIONS["torch"]
    paired = False  # the paired-layout subclass reads its blocks through unpair()
    compiled_write = False  # CPU subclasses with the fused ops write through cpu_fused_ops.cache_kv_

    def cache_shapes(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
        n, h, bs, hd = num_blocks, num_kv_heads, self.block_size, head_dim
        return (n, h, hd, bs), (n, h, bs, hd)

    def build_metadata(self, step: StepInput) -> TwinMetadata:
        meta = TwinMetadata(num_decodes=len(step.decode_tables))
        self._slot_metadata(step, meta)
        self._decode_metadata(step, meta)
        self._prefill_metadata(step, meta)
        if self.general:
            meta.sequences = self._sequences(step)
        return meta

    def _slot_metadata(self, step: StepInput, meta: TwinMetadata) -> None:
        dev, bs = self.device, self.block_size
        slot = torch.tensor(step.slots, dtype=torch.long, device=dev)
        if self.compiled_write:  # the compiled write takes the flat slots; the rows below are the torch write's
            meta.fused_slots = slot
            return
        # Cache rows of (token, kv head): ((block * Hkv + h) * block_size + offset), [T * Hkv].
        heads = torch.arange(self.num_kv_heads, device=dev) * bs
        meta.slot_mapping = ((slot // bs * self.num_kv_heads * bs + slot % bs).unsqueeze(1) + heads).view(-1)
        meta.key_slots = (meta.slot_mapping // bs, meta.slot_mapping % bs)

    def _sequences(self, step: StepInput) -> list[tuple[int, int, int, torch.Tensor]]:
        bs = self.block_size
        return [
            (row, q, n, torch.tensor(t[: -(-n // bs)], dtype=torch.long, device=self.device))
            for row, q, n, t in step.sequences()
        ]

    def _prefill_metadata(self, step: StepInput, meta: TwinMetadata) -> None:
        dev = self.device
        for q_start, start, end, table in step.prefills:
            chunk = PrefillChunk(q_start=q_start, q_len=end - start, ctx_len=end)
            if start > 0:  # earlier tokens are in the cache: attend over it with an offset mask
                chunk.block_table = torch.tensor(table, dtype=torch.long, device=dev)
                q_pos = torch.arange(start, end, device=dev).unsqueeze(1)
                chunk.mask = torch.arange(end, device=dev).unsqueeze(0) <= q_pos  # [q_len, ctx_len]
            meta.prefills.append(chunk)

    def _decode_metadata(self, step: StepInput, meta: TwinMetadata) -> None:
        if not step.decode_tables:
            return
        dev, bs = self.device, self.block_size
        width = max(len(t) for t in step.decode_tables)
        padded = [t + [0] * (width - len(t)) for t in step.decode_tables]
        meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
        if min(step.decode_lens) < width * bs:
            lens = torch.tensor(step.decode_lens, device=dev)
            pad = torch.arange(width * bs, device=dev).unsqueeze(0) >= lens.unsqueeze(1)
            bias = torch.zeros(pad.shape, device=dev).masked_fill_(pad, float("-inf"))
            meta.decode_mask = bias[:, None, None, :]  # [D, 1, 1, L]

    # ---- write ------------------------------------------------------------------------------

    def write_kv(self, layer: Attention, k: torch.Tensor, v: torch.Tensor, meta: TwinMetadata) -> None:
        """Store k/v [T, Hkv, hd] in their cache slots (key_slots: block row, offset of each [T * Hkv])."""
        kc, vc, hd = layer.k_cache, layer.v_cache, layer.head_dim
        if meta.fused_slots is not None:
            cpu_fused_ops.cache_kv_(k, v, meta.fused_slots, kc, vc, self.paired)
            return
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

    # ---- attention --------------------------------------------------------------------------

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TwinMetadata
    ) -> torch.Tensor:
        if layer.has_options:
            return self._general(layer, q, meta)
        kc, vc = layer.k_cache, layer.v_cache
        if meta.num_decodes and not meta.prefills:
            return self._decode(layer, q, meta)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            out[:n] = self._decode(layer, q[:n], meta)
        for p in meta.prefills:
            rows = slice(p.q_start, p.q_start + p.q_len)
            qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
            if p.block_table is None:
                ks, vs, mask = k[rows].transpose(0, 1), v[rows].transpose(0, 1), None
            else:
                ks, vs = self._gather_k(kc, p.block_table, p.ctx_len), self._gather_v(vc, p.block_table, p.ctx_len)
                mask = p.mask
            o = F.scaled_dot_product_attention(
                qs, ks.unsqueeze(0), vs.unsqueeze(0), attn_mask=mask, is_causal=mask is None, scale=layer.scale,
                enable_gqa=layer.num_heads != layer.num_kv_heads,
            )  # fmt: skip
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out

    def _plain(self, blocks: torch.Tensor) -> torch.Tensor:
        """Gathered cache blocks in the plain layout: K [..., hd, bs], V [..., bs, hd] (a view when not paired)."""
        return unpair(blocks) if self.paired else blocks

    def _gather_k(self, kc: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
        """A sequence's cached K as [Hkv, n, hd]."""
        blocks = self._plain(kc.index_select(0, table))  # [b, Hkv, hd, bs]
        return blocks.permute(1, 0, 3, 2).reshape(blocks.shape[1], -1, blocks.shape[2])[:, :n]

    def _gather_v(self, vc: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
        """A sequence's cached V as [Hkv, n, hd]."""
        blocks = self._plain(vc.index_select(0, table))  # [b, Hkv, bs, hd]
        return blocks.transpose(0, 1).flatten(1, 2)[:, :n]

    def _decode(self, layer: Attention, q: torch.Tensor, meta: TwinMetadata) -> torch.Tensor:
        """q [D, H, hd] attends over each sequence's cached tokens -> [D, H, hd].

        Batched matmuls block by block over the gathered blocks, never copying K/V into a contiguous
        [D, Hkv, L, hd] layout: for one query per sequence this is several times faster than SDPA's CPU kernel.
        Query heads are grouped per KV head: [D, Hkv, G, hd].
        """
        kc, vc, bt = layer.k_cache, layer.v_cache, meta.decode_block_tables  # bt [D, M]
        d, m = bt.shape
        hkv, bs, hd = layer.num_kv_heads, kc.shape[3], layer.head_dim  # tokens are dim 3 in either layout
        ks = self._plain(kc.index_select(0, bt.view(-1))).reshape(d, m, hkv, hd, bs)
        vs = self._plain(vc.index_select(0, bt.view(-1))).reshape(d, m, hkv, bs, hd)
        qg = q.view(d, 1, hkv, -1, hd)
        g = qg.shape[3]
        scores = torch.matmul(qg, ks)  # [D, M, Hkv, G, bs]
        scores = scores.permute(0, 2, 3, 1, 4).reshape(d, hkv, g, m * bs).float() * layer.scale
        if meta.decode_mask is not None:
            scores = scores + meta.decode_mask  # additive 0 / -inf: [D, 1, 1, M * bs]
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(d, hkv, g, m, bs).permute(0, 3, 1, 2, 4)
        out = torch.matmul(probs, vs).sum(1)  # [D, M, Hkv, G, hd] -> [D, Hkv, G, hd]
        return out.view(d, layer.num_heads, hd)

    def _general(self, layer: Attention, q: torch.Tensor, meta: TwinMetadata) -> torch.Tensor:
        """Every sequence with explicit float32 scores: scale, soft-cap, ALiBi or a position bias, causal and window
        masks."""
        out = torch.empty_like(q)
        group = layer.num_heads // layer.num_kv_heads
        for row, q_len, n, table in meta.sequences:
            ks = self._gather_k(layer.k_cache, table, n).repeat_interleave(group, 0).float()  # [H, n, hd]
            vs = self._gather_v(layer.v_cache, table, n).repeat_interleave(group, 0).float()
            qs = q[row : row + q_len].transpose(0, 1).float()  # [H, q_len, hd]
            scores = torch.matmul(qs, ks.transpose(1, 2)) * layer.scale  # [H, q_len, n]
            if layer.logit_softcap is not None:
                scores = layer.logit_softcap * torch.tanh(scores / layer.logit_softcap)
            q_pos = torch.arange(n - q_len, n, device=q.device)[:, None]
            k_pos = torch.arange(n, device=q.device)[None, :]
            if layer.alibi_slopes is not None:
                scores = scores + layer.alibi_slopes.to(q.device)[:, None, None] * (k_pos - q_pos)
            if layer.position_bias is not None:
                scores = scores + layer.position_bias(k_pos - q_pos).float()
            allowed = k_pos <= q_pos
            if layer.sliding_window is not None:
                allowed = allowed & (k_pos > q_pos - layer.sliding_window)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[row : row + q_len] = torch.matmul(probs, vs).transpose(0, 1).to(q.dtype)
        return out
