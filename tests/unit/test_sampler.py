"""Unit tests for engine.sampler on CPU: greedy, seeded sampling, top-n logprobs and the warpers.

Penalties and warpers are checked against transformers' logits processors on random logits,
including the exact -inf mask.
"""

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.sampler import Sampler, SamplingRequest
from engine.sampler_reference import apply_penalties, apply_warpers
from engine.sampling_params import SamplingParams

VOCAB = 64


def random_logits(seed: int, rows: int = 1, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "different -inf masks"
    torch.testing.assert_close(actual, expected)


# ---- penalties and warpers vs transformers ---------------------------------------------------


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
@pytest.mark.parametrize("seed", range(5))
def test_repetition_penalty_matches_transformers(penalty, seed):
    row = random_logits(seed)[0]
    g = gen(100 + seed)
    token_ids = torch.randint(0, VOCAB, (20,), generator=g).tolist()  # with repeats
    ours = apply_penalties(row, SamplingParams(repetition_penalty=penalty), token_ids)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([token_ids]), row.clone().unsqueeze(0))[0]
    assert_same_logits(ours, ref)


def test_penalties_do_not_modify_input():
    row = random_logits(0)[0]
    before = row.clone()
    apply_penalties(row, SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5), [1, 2, 2, 3])
    assert torch.equal(row, before)


def test_penalties_noop_without_history():
    row = random_logits(1)[0]
    assert torch.equal(apply_penalties(row, SamplingParams(repetition_penalty=1.5), []), row)


def test_frequency_penalty_subtracts_frequency_times_penalty():
    """TGI's form: penalty x (count / number of ids so far)."""
    row = random_logits(2)[0]
    out = apply_penalties(row, SamplingParams(frequency_penalty=0.5), [3, 3, 3, 7])
    expected = row.clone()
    expected[3] -= 0.5 * 3 / 4
    expected[7] -= 0.5 * 1 / 4
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.8])
def test_temperature_matches_transformers(temperature):
    scores = random_logits(3, rows=4)
    for i in range(4):
        ours = apply_warpers(scores[i], SamplingParams(temperature=temperature))
        ref = TemperatureLogitsWarper(temperature)(None, scores[i : i + 1].clone())[0]
        assert_same_logits(ours, ref)


@pytest.mark.parametrize("top_k", [1, 2, 5, 40, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(top_k):
    scores = random_logits(4, rows=4)
    for i in range(4):
        ours = apply_warpers(scores[i], SamplingParams(top_k=top_k))
        ref = TopKLogitsWarper(top_k)(None, scores[i : i + 1].clone())[0]
        assert_same_logits(ours, ref)
        assert int(torch.isfinite(ours).sum()) == min(top_k, VOCAB)


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", range(4))
def test_top_p_matches_transformers(top_p, seed):
    scores = random_logits(10 + seed)
    ours = apply_warpers(scores[0], SamplingParams(top_p=top_p))
    ref = TopPLogitsWarper(top_p)(None, scores.clone())[0]
    assert_same_logits(ours, ref)


@pytest.mark.parametrize("typical_p", [1e-6, 0.2, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", range(4))
def test_typical_p_matches_transformers(typical_p, seed):
    scores = random_logits(20 + seed)
    ours = apply_warpers(scores[0], SamplingParams(typical_p=typical_p))
    ref = TypicalLogitsWarper(typical_p)(None, scores.clone())[0]
    assert_same_logits(ours, ref)


@pytest.mark.parametrize("seed", range(6))
def test_warper_chain_matches_transformers(seed):
    """temperature -> top_k -> top_p -> typical_p, in transformers' order."""
    scores = random_logits(30 + seed)
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, typical_p=0.95)
    ours = apply_warpers(scores[0], p)
    ref = scores.clone()
    for warper in (
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
        TypicalLogitsWarper(0.95),
    ):
        ref = warper(None, ref)
    assert_same_logits(ours, ref[0])


def test_warpers_noop_when_unset():
    row = random_logits(5)[0]
    assert torch.equal(apply_warpers(row, SamplingParams(temperature=1.0, top_p=1.0, typical_p=1.0)), row)


# ---- Sampler ----------------------------------------------------------------------------------


def test_greedy_argmax_and_logprob():
    logits = random_logits(40, rows=5)
    out = Sampler()(logits, [SamplingRequest(SamplingParams(), []) for _ in range(5)])
    logp = logits.log_softmax(-1)
    for i, o in enumerate(out):
        assert o.token_id == int(logits[i].argmax())
        assert o.logprob == pytest.approx(float(logp[i, o.token_id]), abs=1e-5)
        assert o.top_tokens == []


def test_top_n_tokens_per_request():
    logits = random_logits(41, rows=3)
    reqs = [
        SamplingRequest(SamplingParams(top_n_tokens=3), []),
        SamplingRequest(SamplingParams(), []),
        SamplingRequest(SamplingParams(top_n_tokens=5), []),
    ]
    out = Sampler()(logits, reqs)
    logp = logits.log_softmax(-1)
    assert out[1].top_tokens == []
    for i, n in ((0, 3), (2, 5)):
        values, indices = logp[i].topk(n)
        assert [t for t, _ in out[i].top_tokens] == indices.tolist()
        assert [lp for _, lp in out[i].top_tokens] == pytest.approx(values.tolist(), abs=1e-5)
        # The greedy choice is the first of the top tokens, with the same logprob.
        assert out[i].top_tokens[0][0] == out[i].token_id
        assert out[i].top_tokens[0][1] == pytest.approx(out[i].logprob, abs=1e-6)


def sample_many(params: SamplingParams, logits: torch.Tensor, seed: int, steps: int = 20) -> list[int]:
    generator = gen(seed)
    sampler = Sampler()
    return [sampler(logits, [SamplingRequest(params, [], generator)])[0].token_id for _ in range(steps)]


def test_seeded_sampling_reproducible():
    logits = random_logits(42, scale=1.0)
    p = SamplingParams(do_sample=True, seed=7)
    a = sample_many(p, logits, seed=7)
    b = sample_many(p, logits, seed=7)
    assert a == b
    assert len(set(a)) > 1  # flat-ish distribution: it really samples
    assert sample_many(p, logits, seed=8) != a


def test_sampled_logprob_is_models_logprob():
    logits = random_logits(43, rows=2, scale=1.0)
    reqs = [SamplingRequest(SamplingParams(temperature=0.5, top_k=10), [], gen(i)) for i in range(2)]
    out = Sampler()(logits, reqs)
    logp = logits.log_softmax(-1)
    for i, o in enumerate(out):
        assert o.logprob == pytest.approx(float(logp[i, o.token_id]), abs=1e-5)


@pytest.mark.parametrize("extra", [{}, {"do_sample": True}, {"temperature": 0.5}, {"top_p": 0.9}])
def test_top_k_one_equals_argmax(extra):
    logits = random_logits(44, rows=8, scale=1.0)
    reqs = [SamplingRequest(SamplingParams(top_k=1, **extra), [], gen(i)) for i in range(8)]
    out = Sampler()(logits, reqs)
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_top_token():
    logits = random_logits(45, rows=4, scale=0.5)
    for seed in range(10):
        reqs = [SamplingRequest(SamplingParams(do_sample=True, top_p=1e-6), [], gen(seed * 10 + i)) for i in range(4)]
        out = Sampler()(logits, reqs)
        assert [o.token_id for o in out] == logits.argmax(-1).tolist()


def test_top_k_samples_stay_in_top_k():
    logits = random_logits(46, scale=0.5)
    allowed = set(logits[0].topk(3).indices.tolist())
    tokens = sample_many(SamplingParams(top_k=3), logits, seed=0, steps=100)
    assert set(tokens) <= allowed
    assert len(set(tokens)) > 1


def test_typical_p_runs_and_stays_in_typical_set():
    logits = random_logits(47, scale=2.0)
    p = SamplingParams(typical_p=0.5)
    allowed = set(torch.isfinite(apply_warpers(logits[0], p)).nonzero().flatten().tolist())
    tokens = sample_many(p, logits, seed=1, steps=50)
    assert set(tokens) <= allowed


def test_repetition_penalty_changes_greedy_choice_not_logprob():
    logits = torch.tensor([[4.0, 3.9, -1.0, 0.5]])
    raw_logp = logits.log_softmax(-1)
    req = SamplingRequest(SamplingParams(repetition_penalty=2.0), [0, 0, 3])
    (out,) = Sampler()(logits, [req])
    assert out.token_id == 1  # 4.0 / 2 = 2.0 < 3.9
    assert out.logprob == pytest.approx(float(raw_logp[0, 1]), abs=1e-6)


def test_mixed_batch_rows_stay_aligned():
    logits = random_logits(48, rows=4)
    logits[1] = -5.0
    logits[1, 9] = 20.0  # sampling row with an overwhelming token
    reqs = [
        SamplingRequest(SamplingParams(), []),
        SamplingRequest(SamplingParams(do_sample=True), [], gen(0)),
        SamplingRequest(SamplingParams(repetition_penalty=1.5), [int(logits[2].argmax())]),
        SamplingRequest(SamplingParams(top_n_tokens=2), []),
    ]
    out = Sampler()(logits, reqs)
    assert len(out) == 4
    assert out[0].token_id == int(logits[0].argmax())
    assert out[1].token_id == 9
    penalized = apply_penalties(logits[2], reqs[2].params, reqs[2].token_ids)
    assert out[2].token_id == int(penalized.argmax())
    assert out[3].token_id == int(logits[3].argmax()) and len(out[3].top_tokens) == 2
    assert out[0].top_tokens == [] and out[1].top_tokens == [] and out[2].top_tokens == []
