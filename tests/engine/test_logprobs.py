"""Logprobs of the chosen tokens and the top_n_tokens alternatives agree with transformers' log-softmax
over the same prompt + generated ids (within 1e-4), in a batch of requests of different lengths.
"""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import ORACLE_CONFIGS, greedy, random_prompt

TOL = 1e-4


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
@pytest.mark.parametrize(
    "config",
    [{}, {"max_batch_total_tokens": 64, "max_batch_prefill_tokens": 16, "block_size": 8}],
    ids=["roomy", "chunked-preempted"],
)
def test_logprobs_and_top_tokens_match_transformers(name: str, config: dict, engines: Engines, oracle: Oracle) -> None:
    prompts = [random_prompt(n, seed=200 + n) for n in (3, 18, 50)]
    top_ns = (3, 0, 5)
    llm = engines(name, **config)
    outs = llm.generate(prompts, [greedy(12, top_n_tokens=k) for k in top_ns])
    for prompt, top_n, out in zip(prompts, top_ns, outs):
        assert out.token_ids == oracle.greedy(name, prompt, 12)
        ref = oracle.log_probs(name, prompt, out.token_ids)  # [steps, V]
        chosen = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert len(out.logprobs) == len(out.token_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)
        assert len(out.top_tokens) == len(out.token_ids)
        for step, tops in enumerate(out.top_tokens):
            assert len(tops) == top_n
            want = torch.topk(ref[step], top_n)
            got_ids = [t for t, _ in tops]
            got_lps = torch.tensor([lp for _, lp in tops])
            # Same values in the same (descending) order; ids checked through their reference logprobs,
            # so a near-tie swapping two ids within the tolerance is not a failure.
            torch.testing.assert_close(got_lps, want.values, atol=TOL, rtol=0)
            torch.testing.assert_close(ref[step][got_ids], got_lps, atol=TOL, rtol=0)
            assert len(set(got_ids)) == top_n
            if top_n:  # greedy: the best alternative is the chosen token
                assert got_ids[0] == out.token_ids[step]


def test_logprobs_under_sampling_are_the_models_own(engines: Engines, oracle: Oracle) -> None:
    """With warpers on, reported logprobs are still the raw model's (log-softmax of unwarped logits)."""
    prompt = random_prompt(9, seed=7)
    params = [
        dict(do_sample=True, temperature=0.7, seed=1, top_n_tokens=2),
        dict(do_sample=True, top_k=5, top_p=0.9, seed=2, top_n_tokens=2),
    ]
    llm = engines("llama_gqa")
    for kw in params:
        out = llm.generate([prompt], SamplingParams(max_new_tokens=10, **kw))[0]
        ref = oracle.log_probs("llama_gqa", prompt, out.token_ids)
        chosen = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)
        for step, tops in enumerate(out.top_tokens):
            torch.testing.assert_close(
                torch.tensor([lp for _, lp in tops]), torch.topk(ref[step], 2).values, atol=TOL, rtol=0
            )
