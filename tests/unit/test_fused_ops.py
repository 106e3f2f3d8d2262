"""The compiled CPU element-wise ops (csrc/fused_ops.c) against their torch twins, which the engine tests hold
to transformers: residual add + RMSNorm, SiLU * up, rotary in place, and the greedy pick with its logprob (grammar
rows: among their bitmask's ids). float32 agrees to float rounding; bfloat16 to one bf16 rounding step at most.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from engine.grammar.bitmask import apply_token_mask, unpack
from engine.layers import cpu_fused_ops
from engine.layers.activation import SiluAndMul
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2}}
DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_the_ops_build_here() -> None:
    assert cpu_fused_ops.supports(torch.device("cpu"), torch.bfloat16), "a C compiler is on every test machine"
    assert not cpu_fused_ops.supports(torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 576 rows run on several threads
def test_add_rms_norm(dtype: torch.dtype, rows: int) -> None:
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = _randn(576, dtype=dtype, seed=1)
    wide = _randn(rows, 2 * 576, dtype=dtype, seed=2)
    x = wide[:, 100:676]  # strided rows, as a view of a wider tensor
    residual = _randn(rows, 576, dtype=dtype, seed=3)
    want_out, want_sum = norm(x, residual.clone())
    got_out, got_sum = cpu_fused_ops.add_rms_norm(x, norm.weight, norm.eps, residual)
    assert got_sum.data_ptr() == residual.data_ptr(), "the residual is updated in place"
    torch.testing.assert_close(got_sum, want_sum, **TOL[dtype])
    torch.testing.assert_close(got_out, want_out, **TOL[dtype])
    alone, same = cpu_fused_ops.add_rms_norm(x, norm.weight, norm.eps, None)
    assert same is x or same.data_ptr() == x.data_ptr()
    torch.testing.assert_close(alone, norm(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 32, 200])
def test_silu_and_mul(dtype: torch.dtype, rows: int) -> None:
    x = _randn(rows, 2 * 1536, dtype=dtype, seed=4) * 6  # exp over a wide range of gate values
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5]).to(dtype)  # saturated and zero gates
    torch.testing.assert_close(cpu_fused_ops.silu_and_mul(x), SiluAndMul()(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 6])
def test_rotary_in_place(dtype: torch.dtype, head_dim: int) -> None:
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=10000.0)
    rope = RotaryEmbedding(cfg, head_dim, max_position=4096)
    rows, heads = 50, 5  # q and k heads to rotate; one more head (v) that must stay untouched
    qkv = _randn(rows, (heads + 1) * head_dim, dtype=dtype, seed=5)
    positions = torch.randint(0, 4096, (rows,), generator=torch.Generator().manual_seed(6))
    cos, sin = rope.lookup(positions, dtype)
    want = apply_rotary(qkv[:, : heads * head_dim].view(rows, heads, head_dim), cos, sin)
    v_before = qkv[:, heads * head_dim :].clone()
    cpu_fused_ops.rotary_(qkv, heads, head_dim, positions, rope.cos, rope.sin_signed)
    torch.testing.assert_close(qkv[:, : heads * head_dim].view(rows, heads, head_dim), want, **TOL[dtype])
    assert torch.equal(qkv[:, heads * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [49152, 401, 5])
def test_greedy_pick_and_logprob(vocab: int, dtype: torch.dtype) -> None:
    logits = _randn(32, vocab, dtype=torch.float32, seed=7) * 8
    logits[1, :] = 3.0  # all tied: the first index wins, as torch's max
    logits[2, vocab // 2] = logits[2, -1] = 1e4  # a tie far apart
    logits[3, :] = float("-inf")
    logits[3, vocab - 1] = 0.0  # one finite entry
    logits = logits.to(dtype)  # bf16: many more ties, read exactly as float32
    ids, logprobs = cpu_fused_ops.greedy(logits)
    want_lp, want_ids = torch.log_softmax(logits.float(), dim=-1).max(dim=-1)
    assert ids == want_ids.tolist()
    torch.testing.assert_close(torch.tensor(logprobs), want_lp, atol=1e-5, rtol=1e-5)


def _masks(vocab: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Grammar bitmasks [8, ceil(V / 32)] int32 of assorted densities, and which row of 32 logits uses which (-1:
    none): a single id, a few, half, all, none (all ids refused) and the last id only."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(8, 32 * ((vocab + 31) // 32), generator=g)
    allowed = torch.stack([keep[0] < 1 / vocab, keep[1] < 0.01, keep[2] < 0.5, keep[3] < 2, keep[4] < -1] * 1 + [
        keep[5] < 0.5, keep[6] < 0.05, torch.arange(keep.shape[1]) == vocab - 1])  # fmt: skip
    allowed[0, seed % vocab] = allowed[6, (seed + 1) % vocab] = True  # at least one
    allowed[:, vocab:] = True  # bits past the vocabulary (the last word's spare ones) never count
    bits = (allowed.view(8, -1, 32).long() << torch.arange(32)).sum(-1)
    masks = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    mask_rows = [-1] * 32
    for row, k in enumerate([0, 1, 2, 3, 4, 5, 6, 7, 2, 2]):  # rows 8, 9 share a mask; rows 10.. are free
        mask_rows[row] = k
    return masks, mask_rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [49152, 401, 5])
def test_masked_greedy_pick_and_logprob(vocab: int, dtype: torch.dtype) -> None:
    """Grammar rows among free ones: the pick is torch's argmax after apply_token_mask (the sampler's twin), the
    logprob the model's own log-softmax of it; a row whose allowed ids all have -inf logits picks id 0, as torch."""
    logits = _randn(32, vocab, dtype=torch.float32, seed=17) * 8
    logits[2, :] = 3.0  # all tied: the first allowed id wins
    logits[5, :] = float("-inf")
    logits[5, vocab - 1] = 0.0
    masks, mask_rows = _masks(vocab, seed=vocab)
    logits[6] = torch.where(unpack(masks[6:7], vocab)[0], float("-inf"), 1.0)  # every allowed id at -inf
    logits = logits.to(dtype)
    ids, logprobs = cpu_fused_ops.greedy(logits, masks, mask_rows)
    rows = torch.tensor([max(k, 0) for k in mask_rows])
    masked = torch.where(
        torch.tensor(mask_rows)[:, None] >= 0, apply_token_mask(logits.float(), masks[rows]), logits.float()
    )
    want_ids = masked.argmax(dim=-1)
    assert ids == want_ids.tolist()
    want_lp = torch.log_softmax(logits.float(), dim=-1).gather(1, want_ids[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), want_lp, atol=1e-5, rtol=1e-5)
    free_ids, free_lps = cpu_fused_ops.greedy(logits)  # free rows: as without any mask
    assert ids[10:] == free_ids[10:] and logprobs[10:] == free_lps[10:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paired", [False, True])
def test_cache_write(dtype: torch.dtype, paired: bool) -> None:
    """Each (token, head) lands where the layouts of attention.py put it: plain K [n, Hkv, hd, bs] / V
    [n, Hkv, bs, hd]; paired K [n, Hkv, hd/2, bs, 2] / V [n, Hkv, bs/2, hd, 2]."""
    blocks, hkv, hd, bs, rows = 5, 3, 8, 4, 9
    qkv = _randn(rows, (2 + 2 * hkv) * hd, dtype=dtype, seed=8)  # 2 query heads, then k, then v
    k = qkv[:, 2 * hd : (2 + hkv) * hd].view(rows, hkv, hd)
    v = qkv[:, (2 + hkv) * hd :].view(rows, hkv, hd)
    slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(9))[:rows]
    shape_k, shape_v = (
        ((blocks, hkv, hd // 2, bs, 2), (blocks, hkv, bs // 2, hd, 2))
        if paired
        else (
            (blocks, hkv, hd, bs),
            (blocks, hkv, bs, hd),
        )
    )
    kc, vc = torch.zeros(shape_k, dtype=dtype), torch.zeros(shape_v, dtype=dtype)
    cpu_fused_ops.cache_kv_(k, v, slots, kc, vc, paired)
    for r, slot in enumerate(slots.tolist()):
        b, t = divmod(slot, bs)
        for h in range(hkv):
            if paired:
                got_k = kc[b, h, :, t, :].reshape(hd)
                got_v = vc[b, h, t // 2, :, t % 2]
            else:
                got_k, got_v = kc[b, h, :, t], vc[b, h, t]
            assert torch.equal(got_k, k[r, h]) and torch.equal(got_v, v[r, h])
    assert int((kc != 0).sum()) == int((k != 0).sum()) and int((vc != 0).sum()) == int((v != 0).sum())


@pytest.mark.slow
def test_portable_build_matches_the_native_one(portable_build, monkeypatch) -> None:
    """csrc/fused_ops.c for a baseline x86-64 (the greedy pick's vector extensions without AVX-512) computes the
    same picks, logprobs, norms and activations."""
    portable = cpu_fused_ops.bind_ops(portable_build("fused_ops"))
    logits = _randn(5, 49152, dtype=torch.float32, seed=11) * 8
    wide = _randn(32, 49152, dtype=torch.float32, seed=14) * 8
    masks, mask_rows = _masks(49152, seed=3)
    x = _randn(7, 2 * 576, dtype=torch.bfloat16, seed=12)
    weight = _randn(576, dtype=torch.bfloat16, seed=13)

    def run() -> list:
        picks = [cpu_fused_ops.greedy(logits.to(dtype)) for dtype in DTYPES]
        picks += [cpu_fused_ops.greedy(wide.to(dtype), masks, mask_rows) for dtype in DTYPES]
        norm = cpu_fused_ops.add_rms_norm(x[:, :576], weight, 1e-5, x[:, 576:].contiguous())
        return [picks, norm, cpu_fused_ops.silu_and_mul(x)]

    native = run()
    monkeypatch.setattr(cpu_fused_ops, "_lib", lambda: portable)
    got = run()
    for (ids, lps), (want_ids, want_lps) in zip(got[0], native[0]):
        assert ids == want_ids
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), atol=1e-5, rtol=1e-5)
    for a, b in zip([*got[1], got[2]], [*native[1], native[2]]):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=2**-7)
