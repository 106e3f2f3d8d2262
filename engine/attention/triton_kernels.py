"""Triton GPU kernels over the paged "NHD" KV cache ([num_blocks, block_size, Hkv, D] per layer): write_kv stores
a step's new keys/values at their slots; paged_attention runs one flattened batch of decode rows and prefill
chunks (over a cached prefix) with online softmax, optionally splitting a decode batch's keys (flash decoding).
paged_attention_reference (re-exported) is the slow twin; tile sizes come from triton_config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.paged_reference import paged_attention_reference
from engine.attention.triton_config import (
    MAX_KV_SPLITS,
    MERGE_OPTIONS,
    WRITE_KV_OPTIONS,
    attention_constexprs,
    choose_num_kv_splits,
    merge_constexprs,
    write_kv_constexprs,
)

__all__ = ["choose_num_kv_splits", "paged_attention", "paged_attention_reference", "write_kv"]


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckb, stride_ckt, stride_ckh, stride_cvb, stride_cvt, stride_cvh,
    block_size,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    # one program per token row: copies its [Hkv, D] keys and values to slot = block * block_size + offset. The
    # slots arrive as int32 (the step's packed inputs): widened first, as block * stride_ckb passes 2^31 elements
    # in one layer's cache on a large GPU.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padded row
        return
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    k_dst = k_cache_ptr + block * stride_ckb + offset * stride_ckt + h * stride_ckh + d
    v_dst = v_cache_ptr + block * stride_cvb + offset * stride_cvt + h * stride_cvh + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# The block-table stride is the step's widest table (it changes from step to step in eager mode): not specialized,
# so a new width never compiles a new variant mid-serving, and the launched kernel is the one compiled ahead of time.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, alibi_ptr,
    split_out_ptr, split_lse_ptr,
    scale, softcap, sliding_window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # grid (sequence, KV head, query block), or (sequence, KV head, key split) for a split decode batch. The
    # BLOCK_M rows of the tile are BLOCK_Q query tokens x GROUP_PAD query heads (the GROUP heads sharing this KV
    # head, padded): row r = token r // GROUP_PAD, head r % GROUP_PAD.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    if NUM_SPLITS > 1:
        q_block = 0
        split = tl.program_id(2)
    else:
        q_block = tl.program_id(2)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    # padding (q_len 0, or seq_len 0 under a padded row: seq_len < q_len), or a block past this sequence's rows
    if (q_block * BLOCK_Q >= q_len) | (seq_len < q_len):
        return
    context = seq_len - q_len  # tokens cached before this step's rows

    rows = tl.arange(0, BLOCK_M)
    token = q_block * BLOCK_Q + rows // GROUP_PAD  # index among this sequence's query rows
    g = rows % GROUP_PAD
    head = kv_head * GROUP + g
    row_ok = (token < q_len) & (g < GROUP)
    q_pos = context + token  # [BLOCK_M] absolute position of each row
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_row = (q_begin + token).to(tl.int64)
    q_tile = tl.load(
        q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, DIM_PAD]
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=g < GROUP, other=0.0)

    # keys [kv_lo, kv_hi): causal end of the block's last valid row; a window drops keys before its first row's
    kv_hi = context + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(context + q_block * BLOCK_Q - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
    if NUM_SPLITS > 1:  # this split's share of the keys, whole tiles of them
        per_split = tl.cdiv(tl.cdiv(kv_hi, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = tl.maximum(kv_lo, split * per_split)
        kv_hi = tl.minimum(kv_hi, (split + 1) * per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        k_pos = start + cols  # [BLOCK_N]
        k_ok = k_pos < kv_hi
        block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        offset = k_pos % BLOCK_SIZE
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k_off = block * stride_kb + offset * stride_kt + kv_head * stride_kh
        v_off = block * stride_vb + offset * stride_vt + kv_head * stride_vh
        k_tile = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v_tile = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:  # softcap * tanh(s / softcap); tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1
            e = tl.exp(-2.0 * tl.abs(s) / softcap)
            s = tl.where(s < 0.0, -softcap, softcap) * (1.0 - e) / (1.0 + e)
        if USE_ALIBI:
            s += slope[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
        s = tl.where(allowed, s * 1.4426950408889634, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 finite
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS > 1:  # the split's normalized output and log2-sum-exp2 (-inf: no visible key in this split)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        ws_row = (seq.to(tl.int64) * NUM_SPLITS + split) * (tl.num_programs(1) * GROUP) + head  # [S, splits, H]
        tl.store(split_lse_ptr + ws_row, lse, mask=row_ok)
        tl.store(split_out_ptr + ws_row[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
    else:
        o_row = (q_begin + token).to(tl.int64)
        o_ptrs = out_ptr + o_row[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr, split_out_ptr, split_lse_ptr, seq_lens_ptr, query_start_loc_ptr,
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    # grid (sequence, query head): out row = the splits' outputs weighted by exp2(lse - max lse), normalized
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if (q_len <= 0) | (tl.load(seq_lens_ptr + seq) < q_len):  # padding
        return
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    ws_row = (seq.to(tl.int64) * NUM_SPLITS + splits) * tl.num_programs(1) + head
    lse = tl.load(split_lse_ptr + ws_row, mask=splits < NUM_SPLITS, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # the last key (the row's own position) is always visible: max finite
    mask = (splits < NUM_SPLITS)[:, None] & (dims < HEAD_DIM)[None, :]
    parts = tl.load(split_out_ptr + ws_row[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    merged = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    o_ptrs = out_ptr + q_begin.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(o_ptrs, merged.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, Hkv, D] (rows may be strided, heads contiguous) into k_cache / v_cache
    [num_blocks, block_size, Hkv, D] at slot_mapping [T] int32 or int64 (block * block_size + offset); a negative
    slot skips its row. Cache offsets are 64-bit: a layer's cache may hold more than 2^31 elements."""
    tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit cache {tuple(k_cache.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("write_kv: the head dimension must be contiguous")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"write_kv: slot_mapping {tuple(slot_mapping.shape)} != ({tokens},)")
    if tokens == 0:
        return
    _write_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        k_cache.shape[1],
        **write_kv_constexprs(num_kv_heads, head_dim), **WRITE_KV_OPTIONS,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    num_kv_splits: int = 1,
) -> torch.Tensor:
    """Paged attention of one flattened batch (decode rows and prefill chunks); see paged_attention_reference for
    the exact semantics. q, out [T, H, D] (rows may be strided, heads contiguous); block_tables [S, max_blocks]
    int32; seq_lens [S] int32; query_start_loc [S+1] int32; max_query_len >= every q_len. The grid is
    (S, Hkv, cdiv(max_query_len, block_q)): it depends on no tensor's contents, so a decode step with a fixed
    padded S can be captured in a CUDA graph.
    num_kv_splits > 1 (decode-only batches, max_query_len 1; see choose_num_kv_splits) splits each sequence's
    keys over that many programs, grid (S, Hkv, num_kv_splits), and merges the parts in a second kernel."""
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads or tuple(k_cache.shape[3:]) != (head_dim,):
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or out.shape != q.shape or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError("paged_attention: v_cache, out or query_start_loc has the wrong shape")
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("paged_attention: the head dimension must be contiguous")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"paged_attention: block_size {block_size} is not a power of two >= 16")
    if alibi_slopes is not None and alibi_slopes.shape != (num_heads,):
        raise ValueError(f"paged_attention: alibi_slopes {tuple(alibi_slopes.shape)} != ({num_heads},)")
    if (sliding_window is not None and sliding_window < 1) or (softcap is not None and not softcap > 0):
        raise ValueError(f"paged_attention: sliding_window {sliding_window} and softcap {softcap} must be positive")
    if not 1 <= num_kv_splits <= MAX_KV_SPLITS or (num_kv_splits > 1 and max_query_len > 1):
        raise ValueError(f"paged_attention: num_kv_splits {num_kv_splits} needs a decode-only batch, at most "
                         f"{MAX_KV_SPLITS}")  # fmt: skip
    if num_seqs == 0 or max_query_len <= 0:
        return out
    constexprs, tiles = attention_constexprs(
        head_dim, q.dtype, num_heads // num_kv_heads, block_size, max_query_len,
        sliding_window=sliding_window is not None, softcap=softcap is not None, alibi=alibi_slopes is not None,
        num_kv_splits=num_kv_splits,
    )  # fmt: skip
    if num_kv_splits > 1:  # per sequence and split: normalized partial outputs and their log2-sum-exp2
        split_out = torch.empty(num_seqs, num_kv_splits, num_heads, head_dim, dtype=torch.float32, device=q.device)
        split_lse = torch.empty(num_seqs, num_kv_splits, num_heads, dtype=torch.float32, device=q.device)
        grid = (num_seqs, num_kv_heads, num_kv_splits)
    else:
        split_out = split_lse = out  # unused
        grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, tiles.block_q))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        alibi_slopes if alibi_slopes is not None else seq_lens,  # an unused pointer without ALiBi
        split_out, split_lse,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        **constexprs, **tiles.launch_options(),
    )  # fmt: skip
    if num_kv_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, split_out, split_lse, seq_lens, query_start_loc, out.stride(0), out.stride(1),
            **merge_constexprs(num_kv_splits, head_dim), **MERGE_OPTIONS,
        )  # fmt: skip
    return out
