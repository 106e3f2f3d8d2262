"""Every native family beyond Llama (tiny random checkpoints, family_models.py) against transformers: greedy tokens
identical to `generate` for a staggered batch with chunked prefill and preemption, logprobs within 1e-4 of
transformers' log-softmax, and two tensor-parallel ranks giving the tokens of one.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM

from .conftest import Engines, Oracle, TinyModels, greedy, random_prompt
from .family_models import FAMILY_SPECS
from .test_greedy import _check_staggered

DECODER_ONLY = [name for name, spec in FAMILY_SPECS.items() if not spec.seq2seq]
TOL = 1e-4
# 16 blocks of 16 tokens for 8 requests of up to 144 tokens: preempted and recomputed; prompts prefilled 32 at a time
TIGHT = dict(max_batch_total_tokens=256, max_batch_prefill_tokens=32, block_size=16)


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_tokens_and_logprobs_match_transformers_with_chunks_and_preemption(
    name: str, engines: Engines, oracle: Oracle
) -> None:
    llm = engines(name, **TIGHT)
    before = llm.engine.scheduler.num_preemptions
    outs = _check_staggered(llm, oracle, name)
    assert llm.engine.scheduler.num_preemptions > before, "the small KV pool never preempted"
    for out in outs:
        ref = oracle.log_probs(name, out.prompt_token_ids, out.token_ids)
        chosen = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)


TP_PROMPTS = [random_prompt(n, seed) for n, seed in [(3, 1), (40, 3), (90, 5)]]


@pytest.mark.parametrize("name", [n for n in DECODER_ONLY if FAMILY_SPECS[n].tp])
def test_two_ranks_give_the_tokens_of_one(name: str, tiny_models: TinyModels, engines: Engines) -> None:
    config = dict(dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=48)
    reference = engines(name, **config).generate(TP_PROMPTS, greedy(16))
    with LLM(str(tiny_models(name)), tensor_parallel_size=2, **config) as two:
        outs = two.generate(TP_PROMPTS, greedy(16))
    for out, ref in zip(outs, reference):
        assert out.token_ids == ref.token_ids
        assert out.logprobs == pytest.approx(ref.logprobs, abs=TOL)
