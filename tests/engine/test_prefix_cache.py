"""Prefix caching end to end: requests that share leading tokens with earlier ones, or with others admitted in the
same step, start from the cached KV blocks, and their tokens and logprobs still equal transformers' (float32), also
when a small pool forces preemption and eviction of cached blocks, and after a step that failed.
"""

from __future__ import annotations

import pytest

from engine import LLM
from tests.support.oracle import Oracle
from tests.support.tiny_models import ORACLE_CONFIGS, TinyModels, greedy, random_prompt

BLOCK = 8
PREFIX = random_prompt(37, seed=5)  # 4 full blocks of 8, then 5 tokens into the fifth
WAVE1 = [PREFIX + random_prompt(n, seed=10 + i) for i, n in enumerate((3, 9, 17))]
WAVE2 = [PREFIX + random_prompt(n, seed=20 + i) for i, n in enumerate((1, 12))] + [WAVE1[0], PREFIX]


def _check(llm: LLM, oracle: Oracle, name: str, prompts: list[list[int]], max_new: int = 12) -> None:
    for prompt, out in zip(prompts, llm.generate(prompts, greedy(max_new))):
        assert out.token_ids == oracle.greedy(name, prompt, max_new), f"prompt of {len(prompt)} tokens diverges"


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
def test_later_requests_reuse_the_shared_prefix(name: str, tiny_models: TinyModels, oracle: Oracle) -> None:
    llm = LLM(str(tiny_models(name)), dtype="float32", block_size=BLOCK, max_batch_total_tokens=2048)
    bm = llm.engine.block_manager
    _check(llm, oracle, name, WAVE1)
    # One step prefills the whole first wave: the first prompt fills the prefix's 4 full blocks, and the other
    # two, admitted in the same step, read them instead of computing them.
    assert bm.hit_tokens == 2 * 4 * BLOCK
    _check(llm, oracle, name, WAVE2)
    # Each second-wave prompt shares the prefix's 4 full blocks (the repeated prompt: also at most 4, since
    # (40 - 1) // 8 = 4 leaves its last token to compute).
    assert bm.hit_tokens == (2 + 4) * 4 * BLOCK
    assert bm.num_free_blocks == bm.num_blocks


def test_small_pool_preempts_and_evicts_and_stays_exact(tiny_models: TinyModels, oracle: Oracle) -> None:
    llm = LLM(str(tiny_models("llama_gqa")), dtype="float32", block_size=BLOCK, max_batch_total_tokens=96,
              max_batch_prefill_tokens=24)  # fmt: skip
    eng = llm.engine
    _check(llm, oracle, "llama_gqa", WAVE1 + WAVE2, max_new=20)
    assert eng.scheduler.num_preemptions > 0 and eng.block_manager.hit_tokens > 0


def test_prefix_caching_can_be_turned_off(tiny_models: TinyModels, oracle: Oracle) -> None:
    llm = LLM(str(tiny_models("qwen2")), dtype="float32", block_size=BLOCK, enable_prefix_caching=False,
              max_batch_total_tokens=2048)  # fmt: skip
    _check(llm, oracle, "qwen2", WAVE1)
    _check(llm, oracle, "qwen2", WAVE2)
    assert llm.engine.block_manager.hit_tokens == 0 and not llm.engine.block_manager.cached


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_step_leaves_no_unwritten_block_cached(
    error: type[BaseException], tiny_models: TinyModels, oracle: Oracle
) -> None:
    """The model fails (or is interrupted) on the step that was to fill the shared blocks: they are uncached, the
    requests wait again, and the next steps recompute them exactly."""
    llm = LLM(str(tiny_models("llama_gqa")), dtype="float32", block_size=BLOCK, max_batch_total_tokens=2048)
    eng, runner = llm.engine, llm.engine.runner
    execute = runner.execute

    def fail_once(*args, **kwargs):
        runner.execute = execute
        raise error("injected")

    runner.execute = fail_once
    ids = [eng.add_request(p, greedy(8)) for p in WAVE1]
    with pytest.raises(error, match="injected"):
        eng.step()
    assert eng.scheduler.num_waiting == len(WAVE1) and not eng.block_manager.cached
    finals = {}
    while eng.has_unfinished_requests():
        finals.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    for rid, prompt in zip(ids, WAVE1):
        assert finals[rid] == oracle.greedy("llama_gqa", prompt, 8)
