"""The batched sampler against its per-row twin, token for token on the same seeds, and at numeric extremes.

The twin's warpers are checked against transformers in test_sampler.py; the draw (argmax of probs / Exp(1) noise) is
checked here against the probabilities themselves, so both halves rest on something other than our own code.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.grammar.bitmask import allowed_from_bits, unpack
from engine.sampler import NON_FINITE, Sampler, SamplingRequest
from engine.sampler_reference import apply_warpers
from engine.sampling_params import MIN_TEMPERATURE, SamplingParams

VOCAB = 97


def random_params(rng: random.Random) -> SamplingParams:
    """Every parameter on or off at random, with values across their ranges."""

    def maybe(value):
        return value if rng.random() < 0.5 else None

    return SamplingParams(
        do_sample=rng.random() < 0.5,
        temperature=maybe(rng.choice([0.05, 0.7, 1.0, 1.6, 1e-7])),
        top_k=maybe(rng.choice([1, 3, 20, VOCAB, 10**30])),
        top_p=maybe(rng.choice([1e-9, 1e-6, 0.3, 0.9, 1.0])),
        typical_p=maybe(rng.choice([1e-6, 0.5, 0.95, 1.0])),
        repetition_penalty=maybe(rng.choice([0.5, 1.0, 1.3, 1e-300, 1e300])),
        frequency_penalty=maybe(rng.choice([-2.0, -0.5, 0.0, 0.8, 2.0])),
        top_n_tokens=rng.choice([0, 0, 1, 5]),
    )


def requests_for(rng: random.Random, rows: int, seed: int) -> list[SamplingRequest]:
    out = []
    for i in range(rows):
        p = random_params(rng)
        history = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 30))] if p.needs_processing else []
        out.append(SamplingRequest(p, history, torch.Generator().manual_seed(seed * 1000 + i)))
    return out


def regenerate(requests: list[SamplingRequest], seed: int) -> list[SamplingRequest]:
    """The same requests with fresh generators at the same seeds (and the same grammar masks)."""
    return [
        SamplingRequest(r.params, r.token_ids, torch.Generator().manual_seed(seed * 1000 + i), r.allowed)
        for i, r in enumerate(requests)
    ]


def random_mask(rng: random.Random, vocab: int = VOCAB) -> tuple[torch.Tensor, set[int]]:
    """A grammar's token bitmask [ceil(V / 32)] int32 allowing a random set of 1 to V ids (the set too)."""
    ids = set(rng.sample(range(vocab), rng.choice([1, 2, 5, vocab // 2, vocab])))
    words = [0] * -(-vocab // 32)
    for i in ids:
        words[i // 32] |= 1 << (i % 32)
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # int32 words, as llguidance writes them
    return torch.tensor(signed, dtype=torch.int32), ids


@pytest.mark.parametrize("seed", range(12))
def test_batched_equals_per_row_twin(seed: int) -> None:
    rng = random.Random(seed)
    rows = rng.randrange(1, 12)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * rng.choice([0.5, 3.0, 30.0])
    requests = requests_for(rng, rows, seed)
    batched = Sampler()(logits, requests)
    twin = Sampler().reference(logits, regenerate(requests, seed))
    for b, t in zip(batched, twin):
        assert b.error == t.error
        assert b.token_id == t.token_id
        assert b.logprob == pytest.approx(t.logprob, abs=1e-6)
        assert [i for i, _ in b.top_tokens] == [i for i, _ in t.top_tokens]


def test_batched_equals_twin_over_many_steps() -> None:
    """A sampled stream stays identical step after step (generators advance the same way)."""
    rng = random.Random(99)
    requests = requests_for(rng, 6, 7)
    twins = regenerate(requests, 7)
    for step in range(25):
        logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(step))
        a = [o.token_id for o in Sampler()(logits, requests)]
        b = [o.token_id for o in Sampler().reference(logits, twins)]
        assert a == b, step


@pytest.mark.slow
def test_draws_follow_the_distribution() -> None:
    """argmax(probs / Exp(1)) samples from probs: a chi-square test over 20k draws of the warped distribution."""
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=0.8, top_k=6)
    probs = apply_warpers(logits[0], p).softmax(-1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    sampler = Sampler()
    n = 20000
    batch = 500
    for _ in range(n // batch):
        out = sampler(logits.expand(batch, 8), [SamplingRequest(p, [], generator) for _ in range(batch)])
        for o in out:
            counts[o.token_id] += 1
    expected = probs * n
    support = expected > 0
    assert counts[~support].sum() == 0  # never a token top_k dropped
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, MIN_TEMPERATURE / 2])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1)) * 5
    reqs = [
        SamplingRequest(SamplingParams(do_sample=True, temperature=temperature), [], torch.Generator())
        for _ in range(3)
    ]
    out = Sampler()(logits, reqs)
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()
    assert all(o.error is None for o in out)


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 1e300, 1.7976931348623157e308])
@pytest.mark.parametrize("do_sample", [False, True])
def test_extreme_repetition_penalty_stays_finite(penalty: float, do_sample: bool) -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2)) * 5
    p = SamplingParams(do_sample=do_sample, repetition_penalty=penalty, temperature=0.7 if do_sample else None)
    reqs = [SamplingRequest(p, list(range(0, VOCAB, 3)), torch.Generator().manual_seed(i)) for i in range(2)]
    out = Sampler()(logits, reqs)
    twin = Sampler().reference(
        logits, [SamplingRequest(p, r.token_ids, torch.Generator().manual_seed(i)) for i, r in enumerate(reqs)]
    )
    assert all(o.error is None for o in out)
    assert [o.token_id for o in out] == [o.token_id for o in twin]


def test_huge_temperature_is_near_uniform_and_finite() -> None:
    logits = torch.randn(1, VOCAB) * 10
    reqs = [SamplingRequest(SamplingParams(temperature=1e300), [], torch.Generator().manual_seed(0))]
    (out,) = Sampler()(logits, reqs)
    assert out.error is None and 0 <= out.token_id < VOCAB


def test_a_non_finite_row_fails_alone() -> None:
    """A NaN row (as a broken model row would give) is flagged; the other rows of the batch are sampled as usual."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(4))
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    reqs = [SamplingRequest(SamplingParams(do_sample=True), [], torch.Generator().manual_seed(i)) for i in range(4)]
    out = Sampler()(logits, reqs)
    assert out[1].error == NON_FINITE and out[2].error == NON_FINITE
    assert out[0].error is None and out[3].error is None
    twin = Sampler().reference(
        logits, [SamplingRequest(r.params, [], torch.Generator().manual_seed(i)) for i, r in enumerate(reqs)]
    )
    assert [o.token_id for o in out if o.error is None] == [o.token_id for o in twin if o.error is None]
    assert twin[1].error and twin[2].error


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"repetition_penalty": float("inf")},
        {"frequency_penalty": float("nan")},
        {"seed": 2**64},
        {"seed": -1},
    ],
)
def test_unrepresentable_values_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_plain_greedy_row_fails_too(fused: bool) -> None:
    """Greedy rows with no processing are flagged too (the fused CPU pick included), never answered with id 0."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[1] = float("nan")
    reqs = [SamplingRequest(SamplingParams(), []) for _ in range(3)]
    out = Sampler(fused=fused)(logits, reqs)
    assert [o.error for o in out] == [None, NON_FINITE, None]
    assert Sampler().reference(logits, reqs)[1].error == NON_FINITE


def test_unpacked_bits_are_the_bits() -> None:
    """The batched unpacking against a bit-by-bit reading of the same words (vocab not a multiple of 32)."""
    rng = random.Random(5)
    masks = [random_mask(rng) for _ in range(6)]
    allowed = unpack(torch.stack([m for m, _ in masks]), VOCAB)
    for row, (bits, ids) in zip(allowed, masks):
        assert sorted(torch.nonzero(row)[:, 0].tolist()) == sorted(ids) == allowed_from_bits(bits.tolist(), VOCAB)


@pytest.mark.parametrize("seed", range(10))
def test_masked_rows_batched_equal_twin_and_stay_inside_the_mask(seed: int) -> None:
    """Grammar rows mixed with free rows: the batched sampler equals the per-row twin token for token, a masked
    row's token is always an allowed one, and the free rows are sampled exactly as in a batch without masks."""
    rng = random.Random(100 + seed)
    rows = rng.randrange(2, 10)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * rng.choice([0.5, 3.0, 30.0])
    plain = requests_for(rng, rows, seed)
    masks = {i: random_mask(rng) for i in range(rows) if rng.random() < 0.5}
    masked = [
        SamplingRequest(r.params, r.token_ids, r.generator, masks[i][0] if i in masks else None)
        for i, r in enumerate(plain)
    ]
    batched = Sampler()(logits, masked)
    fused = Sampler(fused=True)(logits, regenerate(masked, seed))  # greedy rows fused (masked too), others batched
    twin = Sampler().reference(logits, regenerate(masked, seed))
    unmasked = Sampler()(logits, regenerate(plain, seed))
    assert [(o.token_id, o.error) for o in fused] == [(o.token_id, o.error) for o in batched]
    for f, b in zip(fused, batched):
        assert f.error is not None or f.logprob == pytest.approx(b.logprob, abs=1e-5)
    for i, (b, t, u) in enumerate(zip(batched, twin, unmasked)):
        assert b.error == t.error
        assert b.token_id == t.token_id
        assert b.logprob == pytest.approx(t.logprob, abs=1e-6)
        if i in masks:
            assert b.error is not None or b.token_id in masks[i][1]
            assert b.logprob == pytest.approx(torch.log_softmax(logits[i], -1)[b.token_id].item(), abs=1e-6)
        else:
            assert (b.token_id, b.error) == (u.token_id, u.error)


def test_a_plain_greedy_row_with_a_mask_takes_the_best_allowed_token() -> None:
    logits = torch.arange(VOCAB, dtype=torch.float32).repeat(2, 1)  # the last id is the best
    bits, _ = random_mask(random.Random(0))
    bits.zero_()
    bits[0] = 0b1010  # ids 1 and 3 only
    reqs = [SamplingRequest(SamplingParams(), [], None, bits), SamplingRequest(SamplingParams(), [], None)]
    assert [o.token_id for o in Sampler()(logits, reqs)] == [3, VOCAB - 1]
    assert [o.token_id for o in Sampler(fused=True)(logits, reqs)] == [3, VOCAB - 1]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_grammar_rows_take_the_fused_pick_and_equal_the_batched_sampler(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU, greedy grammar rows without processing are picked by the compiled kernel with their masks (the
    others, sampled or penalised, masked or not, by the batched sampler): tokens, errors and logprobs equal the
    batched sampler's and the per-row twin's, and every masked row's token is an allowed one."""
    from engine.layers import cpu_fused_ops

    rng = random.Random(300 + seed)
    kinds = [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.9, top_k=20),
        SamplingParams(repetition_penalty=1.3),
    ]
    rows = 12
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * rng.choice([0.5, 3.0, 30.0])
    if seed == 0:
        logits[3, 5] = float("nan")  # a NaN row fails alone, masked or not
    requests, masks = [], {}
    for i in range(rows):
        params = kinds[0] if i < 6 else rng.choice(kinds)
        if i % 2 == 0 or rng.random() < 0.3:
            masks[i] = random_mask(rng)
        history = [rng.randrange(VOCAB) for _ in range(5)]
        allowed = masks[i][0] if i in masks else None
        requests.append(SamplingRequest(params, history, torch.Generator().manual_seed(seed * 1000 + i), allowed))
    calls: list[bool] = []
    greedy = cpu_fused_ops.greedy
    monkeypatch.setattr(
        cpu_fused_ops, "greedy", lambda x, m=None, r=None: calls.append(m is not None) or greedy(x, m, r)
    )
    fused = Sampler(fused=True)(logits, requests)
    assert calls == [True]  # the masked greedy rows went to the kernel
    batched = Sampler()(logits, regenerate(requests, seed))
    twin = Sampler().reference(logits, regenerate(requests, seed))
    for i, (f, b, t) in enumerate(zip(fused, batched, twin)):
        assert f.error == b.error == t.error
        if f.error is None:  # (a failed row's token is never used)
            assert f.token_id == b.token_id == t.token_id
            assert f.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert i not in masks or f.token_id in masks[i][1]
    assert (fused[3].error is not None) == (seed == 0)
