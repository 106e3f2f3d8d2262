"""The slow twin of the Triton paged-attention kernel: the same signature and semantics in plain torch (gather
each sequence's keys through its block table, build the causal / window mask, softmax in float32). Tests compare
the kernel with it; it documents what the kernel computes. Needs no Triton and runs on any device.
"""

from __future__ import annotations

import torch


def paged_attention_reference(
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
) -> torch.Tensor:
    """Attention of the query rows q [T, H, D] over the paged cache k_cache / v_cache
    [num_blocks, block_size, Hkv, D]; writes out [T, H, D] in place and returns it.

    Sequence s owns rows query_start_loc[s]..query_start_loc[s+1] (q_len of them), which are its positions
    seq_lens[s] - q_len .. seq_lens[s] - 1; the row at position p attends positions j <= p (and j > p - window
    with a sliding window). Logits: scale * q.k, then softcap * tanh(logits / softcap), then
    + slope_h * (j - p) with ALiBi. Sequences with q_len 0 or seq_len 0 write nothing. max_query_len is unused
    (it only sizes the kernel's grid).
    """
    del max_query_len
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_begin
        if q_len <= 0 or seq_len <= 0:
            continue
        pos = torch.arange(seq_len, device=k_cache.device)
        blocks = block_tables[s, pos // block_size].long()
        # [seq_len, Hkv, D] -> [H, seq_len, D]: query head h reads KV head h // group
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1).transpose(0, 1)
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[q_begin:q_end].float().transpose(0, 1)  # [H, q_len, D]
        logits = scale * (qs @ k.transpose(1, 2))  # [H, q_len, seq_len]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=k_cache.device)
        rel = pos[None, :] - q_pos[:, None]  # [q_len, seq_len]: key position - query position
        if alibi_slopes is not None:
            logits = logits + alibi_slopes.float().to(logits.device)[:, None, None] * rel[None]
        allowed = rel <= 0
        if sliding_window is not None:
            allowed &= rel > -sliding_window
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[q_begin:q_end] = (probs @ v).transpose(0, 1).to(out.dtype)
    return out
