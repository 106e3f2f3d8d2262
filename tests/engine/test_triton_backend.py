"""The Triton backend through the whole engine, on the CPU under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 where no GPU is): greedy tokens and logprobs equal transformers' over mixed batches with chunked
prefill, cached prefixes (also shared within a step) and preemption, as the CPU backends are held to.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import greedy, random_prompt

pytestmark = pytest.mark.slow

pytest.importorskip("triton")

MODEL = "llama_gqa"
CONFIGS = {
    "roomy": {},
    "chunked": {"max_batch_prefill_tokens": 24},
    "preempted": {"max_batch_total_tokens": 160, "max_num_seqs": 6},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_triton_backend_equals_transformers(config: str, engines: Engines, oracle: Oracle) -> None:
    llm = engines(MODEL, attention_backend="triton", block_size=16, **CONFIGS[config])
    assert llm.engine.runner.plan.attention == "triton"
    assert llm.engine.runner.model.attention_layers()[0].k_cache.shape[1:] == (16, 2, 16)  # NHD blocks
    prompts = [random_prompt(n, seed=500 + n) for n in (1, 15, 16, 17, 40)]
    shared = random_prompt(37, seed=599)
    prompts += [shared + p[:5] for p in prompts[2:5]]  # a prefix cached within one step, then reused
    preemptions = llm.engine.scheduler.num_preemptions
    outs = llm.generate(prompts, greedy(10))
    if config == "preempted":
        assert llm.engine.scheduler.num_preemptions > preemptions
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == oracle.greedy(MODEL, prompt, 10)
        want = oracle.log_probs(MODEL, prompt, out.token_ids).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)
