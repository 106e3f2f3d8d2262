"""Aborting requests: KV blocks go back to the pool wherever the request was (waiting, mid-prefill,
decoding, preempted), other requests are unaffected and still match transformers, and unknown ids
are reported as such.
"""

from __future__ import annotations

import pytest

from tests.support.oracle import Engines, Oracle, run_to_completion
from tests.support.tiny_models import greedy, random_prompt


@pytest.mark.slow
def test_abort_frees_kv_blocks(engines: Engines, oracle: Oracle) -> None:
    llm = engines("llama_gqa", max_batch_total_tokens=512, max_batch_prefill_tokens=32, block_size=16)
    eng, bm = llm.engine, llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    prompts = [random_prompt(n, seed=800 + n) for n in (20, 90, 7, 130, 50)]
    ids = [eng.add_request(p, greedy(30)) for p in prompts]
    produced: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(3):
        for out in eng.step():
            produced[out.request_id] += out.new_token_ids
    assert bm.num_free_blocks < bm.num_blocks
    assert eng.scheduler.num_waiting > 0  # the prefill budget has not reached every prompt yet

    # one mid-prefill (130 tokens at 32 a step), one decoding, one never scheduled
    long_rid, decoding_rid, waiting_rid = ids[3], ids[0], ids[4]
    assert produced[decoding_rid] and not produced[long_rid]
    assert any(s.request_id == waiting_rid for s in eng.scheduler.waiting)
    for rid in (long_rid, decoding_rid, waiting_rid):
        assert eng.abort_request(rid) is True
        assert eng.abort_request(rid) is False  # already gone
    assert eng.abort_request("never-added") is False

    final = {}
    for out in run_to_completion(llm):
        produced[out.request_id] += out.new_token_ids
        assert out.request_id in (ids[1], ids[2]), "an aborted request produced output"
        if out.finished:
            final[out.request_id] = out
    for i in (1, 2):
        assert final[ids[i]].token_ids == oracle.greedy("llama_gqa", prompts[i], 30)
    assert not eng.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_everything_mid_generation(engines: Engines) -> None:
    llm = engines("qwen2", max_batch_total_tokens=256, block_size=16)
    eng, bm = llm.engine, llm.engine.block_manager
    ids = [eng.add_request(random_prompt(n, seed=900 + n), greedy(100)) for n in (10, 60, 100, 33)]
    for _ in range(40):
        eng.step()
    assert eng.scheduler.num_preemptions > 0 and bm.num_free_blocks < bm.num_blocks
    for rid in ids:
        eng.abort_request(rid)
    assert not eng.has_unfinished_requests()
    assert eng.num_requests == 0
    assert bm.num_free_blocks == bm.num_blocks
    assert eng.step() == []


def test_exception_inside_generate_aborts_its_requests(engines: Engines) -> None:
    """LLM.generate aborts what it added when the loop is interrupted (e.g. KeyboardInterrupt)."""
    llm = engines("llama_tied")
    eng = llm.engine
    real_step = eng.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_step()

    eng.step = failing_step
    try:
        try:
            llm.generate([random_prompt(9, seed=1), random_prompt(40, seed=2)], greedy(20))
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the interrupt did not propagate")
    finally:
        del eng.step
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
