"""The pure-torch paged-attention reference (the twin the Triton kernel is tested against) against real
implementations over the whole sequence: torch SDPA (causal; a sliding-window band; Bloom's ALiBi bias from
transformers) and transformers' Gemma-2 eager attention (logit softcap). One batch holds a prefill with no cache
and a chunk over a cached prefix, whose rows must equal the last rows of the full-sequence attention.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from engine.attention.paged_reference import paged_attention_reference

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 32, 16
SEQ_LENS, Q_LENS = [13, 21], [13, 5]  # a prefill with no cache; a chunk of 5 after 16 cached tokens


def _paged(seed: int = 0) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Reference arguments and, per sequence, its whole-sequence q, k, v [1, heads, L, D] for the oracles.
    Each sequence's keys/values are scattered over shuffled cache blocks; q holds only this step's rows."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-n // BLOCK) for n in SEQ_LENS]
    order = torch.randperm(sum(counts) + 1, generator=g).tolist()
    k_cache = torch.zeros(len(order), BLOCK, KV_HEADS, DIM)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.zeros(len(SEQ_LENS), max(counts), dtype=torch.int32)
    q_rows, full = [], []
    used = 0
    for s, (seq_len, q_len) in enumerate(zip(SEQ_LENS, Q_LENS)):
        q, k, v = (torch.randn(seq_len, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
        for pos in range(seq_len):
            block = order[used + pos // BLOCK]
            block_tables[s, pos // BLOCK] = block
            k_cache[block, pos % BLOCK], v_cache[block, pos % BLOCK] = k[pos], v[pos]
        used += counts[s]
        q_rows.append(q[seq_len - q_len :])
        full.append(tuple(t.transpose(0, 1)[None] for t in (q, k, v)))
    args = {
        "q": torch.cat(q_rows), "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
        "seq_lens": torch.tensor(SEQ_LENS, dtype=torch.int32),
        "query_start_loc": torch.tensor([0, *itertools.accumulate(Q_LENS)], dtype=torch.int32),
        "max_query_len": max(Q_LENS), "scale": DIM**-0.5,
    }  # fmt: skip
    return args, full


def _compare(oracle_rows: list[torch.Tensor], **options: object) -> None:
    args, _ = _paged()
    out = paged_attention_reference(out=torch.empty_like(args["q"]), **args, **options)
    torch.testing.assert_close(out, torch.cat(oracle_rows), atol=1e-5, rtol=1e-5)


def _last_rows(attn: torch.Tensor, q_len: int) -> torch.Tensor:
    return attn[0].transpose(0, 1)[-q_len:]  # [1, H, L, D] -> this step's rows [q_len, H, D]


def test_causal_matches_sdpa() -> None:
    _, full = _paged()
    rows = [
        _last_rows(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=DIM**-0.5, enable_gqa=True), n)
        for (q, k, v), n in zip(full, Q_LENS)
    ]
    _compare(rows)


@pytest.mark.parametrize("window", [1, 4, 16])
def test_sliding_window_matches_sdpa_band(window: int) -> None:
    _, full = _paged()
    rows = []
    for (q, k, v), n in zip(full, Q_LENS):
        size = q.shape[2]
        band = torch.ones(size, size, dtype=torch.bool).tril() & ~torch.ones(size, size, dtype=torch.bool).tril(-window)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=DIM**-0.5, enable_gqa=True)
        rows.append(_last_rows(attn, n))
    _compare(rows, sliding_window=window)


def test_alibi_matches_bloom_bias() -> None:
    """Bloom adds slope_h * key_pos; the reference slope_h * (key_pos - query_pos): the same softmax."""
    _, full = _paged()
    rows, slopes = [], None
    for (q, k, v), n in zip(full, Q_LENS):
        size = q.shape[2]
        alibi = build_alibi_tensor(torch.ones(1, size), HEADS, torch.float32)  # [H, 1, L] = slope_h * j
        slopes = alibi[:, 0, 1]
        causal = torch.zeros(size, size).masked_fill(torch.ones(size, size, dtype=torch.bool).triu(1), float("-inf"))
        bias = alibi[None] + causal  # [1, H, L, L]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=DIM**-0.5, enable_gqa=True)
        rows.append(_last_rows(attn, n))
    assert slopes is not None
    _compare(rows, alibi_slopes=slopes)


def test_softcap_matches_gemma2_eager() -> None:
    _, full = _paged()
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=False)
    rows = []
    for (q, k, v), n in zip(full, Q_LENS):
        size = q.shape[2]
        causal = torch.zeros(size, size).masked_fill(torch.ones(size, size, dtype=torch.bool).triu(1), float("-inf"))
        attn, _ = eager_attention_forward(module, q, k, v, causal, scaling=DIM**-0.5, softcap=0.5)
        rows.append(attn[0][-n:])  # eager returns [1, L, H, D]
    _compare(rows, softcap=0.5)


def test_padding_writes_nothing() -> None:
    args, _ = _paged()
    args["seq_lens"] = torch.tensor([13, 0], dtype=torch.int32)  # the second sequence is padding now
    out = paged_attention_reference(out=torch.full_like(args["q"], 7.0), **args)
    assert bool((out[13:] == 7.0).all()) and not bool((out[:13] == 7.0).any())
