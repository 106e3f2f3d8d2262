"""Sampling: a seed fixes the tokens (across calls and whatever else is in the batch), different seeds
differ, every warper and penalty runs and keeps tokens inside the support transformers allows, and
greedy + repetition_penalty is token-exact against transformers `generate(repetition_penalty=...)`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine import SamplingParams
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import ORACLE_CONFIGS, greedy, random_prompt

PROMPT = random_prompt(12, seed=500)


def _sample(**kw) -> SamplingParams:
    """Sampling that ignores EOS, so every request runs its full length."""
    return SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 24), do_sample=True, ignore_eos=True, **kw)


def test_same_seed_same_tokens_alone_and_batched(engines: Engines) -> None:
    llm = engines("llama_gqa")
    params = _sample(seed=1234, temperature=1.3)
    first = llm.generate([PROMPT], params)[0]
    second = llm.generate([PROMPT], params)[0]
    assert first.token_ids == second.token_ids
    assert first.seed == second.seed == 1234
    # the same request between others (sampling ones included), in one batch
    others = [random_prompt(n, seed=510 + n) for n in (3, 40, 7)]
    batch = llm.generate(
        [others[0], PROMPT, others[1], others[2], PROMPT],
        [_sample(seed=1), params, greedy(30), _sample(seed=2, top_k=50), params],
    )
    assert batch[1].token_ids == first.token_ids
    assert batch[4].token_ids == first.token_ids


def test_same_seed_same_tokens_under_preemption(engines: Engines) -> None:
    """Recomputing a preempted request does not consume its generator: the tokens stay the same."""
    params = _sample(seed=77, max_new_tokens=40)
    alone = engines("llama_gqa").generate([PROMPT], params)[0]
    llm = engines("llama_gqa", max_batch_total_tokens=128, max_batch_prefill_tokens=32)
    before = llm.engine.scheduler.num_preemptions
    fillers = [random_prompt(60, seed=520 + i) for i in range(3)]
    outs = llm.generate([PROMPT, *fillers], [params] + [_sample(seed=i, max_new_tokens=40) for i in range(3)])
    assert llm.engine.scheduler.num_preemptions > before
    assert outs[0].token_ids == alone.token_ids


def test_different_seeds_differ(engines: Engines) -> None:
    llm = engines("llama_gqa")
    outs = llm.generate([PROMPT] * 4, [_sample(seed=s) for s in (1, 2, 3, 4)])
    assert len({tuple(o.token_ids) for o in outs}) > 1
    # without a seed, each request draws its own (reported) seed
    unseeded = llm.generate([PROMPT] * 3, _sample())
    assert len({o.seed for o in unseeded}) == 3
    assert len({tuple(o.token_ids) for o in unseeded}) > 1


def test_reported_seed_reproduces_the_output(engines: Engines) -> None:
    llm = engines("qwen2")
    first = llm.generate([PROMPT], _sample(temperature=1.2))[0]
    assert first.seed is not None
    again = llm.generate([PROMPT], _sample(temperature=1.2, seed=first.seed))[0]
    assert again.token_ids == first.token_ids and again.seed == first.seed
    assert llm.generate([PROMPT], greedy(3))[0].seed is None


def _support(logits: torch.Tensor, context: list[int], p: SamplingParams) -> set[int]:
    """Token ids that transformers' own processors and warpers leave finite for one row of logits,
    in transformers' order: repetition penalty, temperature, top_k, top_p, typical_p."""
    processors = LogitsProcessorList()
    if p.repetition_penalty is not None:
        processors.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature is not None:
        processors.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k is not None:
        processors.append(TopKLogitsWarper(p.top_k))
    if p.top_p is not None:
        processors.append(TopPLogitsWarper(p.top_p))
    if p.typical_p is not None:
        processors.append(TypicalLogitsWarper(p.typical_p))
    scores = processors(torch.tensor([context]), logits.unsqueeze(0).clone())[0]
    return set(torch.nonzero(scores > float("-inf")).flatten().tolist())


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 3},
        {"top_p": 0.3},
        {"top_k": 8, "top_p": 0.6},
        {"typical_p": 0.3},
        {"temperature": 0.5, "top_p": 0.5},
        {"temperature": 1.5, "top_k": 20, "top_p": 0.8, "typical_p": 0.6, "repetition_penalty": 1.4},
    ],
    ids=lambda kw: "-".join(kw),
)
def test_sampled_tokens_stay_in_the_transformers_support(kw: dict, engines: Engines, oracle: Oracle) -> None:
    llm = engines("llama_gqa")
    params = [_sample(seed=s, **kw) for s in range(4)]
    outs = llm.generate([PROMPT] * 4, params)
    for p, out in zip(params, outs):
        assert len(out.token_ids) == 24
        logits = oracle.logits("llama_gqa", PROMPT, out.token_ids)  # raw: the repetition penalty is not shift-free
        for step, token in enumerate(out.token_ids):
            allowed = _support(logits[step], PROMPT + out.token_ids[:step], p)
            assert len(allowed) < logits.shape[1], "the warpers should cut the vocabulary"
            assert token in allowed, f"step {step}: token {token} is outside the allowed {sorted(allowed)}"


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.5},
        {"temperature": 2.0, "top_k": 20},
        {"top_p": 0.9},
        {"typical_p": 0.5},
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 1.0},
        {"frequency_penalty": -0.5, "temperature": 0.8, "top_k": 10, "top_p": 0.95, "typical_p": 0.9},
    ],
    ids=lambda kw: "-".join(kw),
)
def test_every_warper_and_penalty_runs(kw: dict, engines: Engines) -> None:
    llm = engines("qwen2")
    a, b = llm.generate([PROMPT, PROMPT], [_sample(seed=9, **kw), _sample(seed=9, **kw)])
    assert a.finish_reason == "length" and len(a.token_ids) == 24
    assert a.token_ids == b.token_ids  # same seed, same batch
    assert all(0 <= t < llm.engine.vocab_size for t in a.token_ids)
    assert all(lp <= 0.0 for lp in a.logprobs)


def test_warpers_without_do_sample_sample(engines: Engines, oracle: Oracle) -> None:
    """As in TGI, a temperature or top_k alone turns sampling on; top_k=1 stays greedy."""
    llm = engines("llama_gqa")
    ref = oracle.greedy("llama_gqa", PROMPT, 24)
    hot = llm.generate([PROMPT] * 3, [SamplingParams(max_new_tokens=24, temperature=5.0, seed=s) for s in range(3)])
    assert any(o.token_ids != ref for o in hot)
    k1 = llm.generate([PROMPT], SamplingParams(max_new_tokens=24, do_sample=True, top_k=1, seed=3))[0]
    assert k1.token_ids == ref


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_repetition_penalty_matches_transformers(
    name: str, penalty: float, engines: Engines, oracle: Oracle
) -> None:
    prompts = [random_prompt(n, seed=600 + n) for n in (2, 20, 45)]
    outs = engines(name).generate(prompts, greedy(24, repetition_penalty=penalty))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == oracle.greedy(name, prompt, 24, repetition_penalty=penalty)


def test_frequency_penalty_discourages_repeats(engines: Engines) -> None:
    """A large frequency penalty makes greedy output repeat tokens less than plain greedy does."""
    llm = engines("llama_tied")
    prompts = [random_prompt(5, seed=700 + i) for i in range(4)]
    plain = llm.generate(prompts, greedy(40))
    penalised = llm.generate(prompts, greedy(40, frequency_penalty=2.0))
    repeats = [len(o.token_ids) - len(set(o.token_ids)) for o in plain]
    repeats_pen = [len(o.token_ids) - len(set(o.token_ids)) for o in penalised]
    assert sum(repeats_pen) < sum(repeats)
