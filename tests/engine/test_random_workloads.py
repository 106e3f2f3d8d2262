"""Randomised workloads: requests of random lengths arrive at random steps into engines with small KV
pools, small prefill budgets, odd block sizes and few sequence slots, some get aborted; greedy ones
must still equal transformers, seeded sampled ones must equal the same request run alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from engine import RequestOutput, SamplingParams
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import ORACLE_CONFIGS, greedy, random_prompt

pytestmark = pytest.mark.slow


@dataclass
class _Req:
    prompt: list[int]
    params: SamplingParams
    arrival: int  # step at which it is added
    abort_at: int | None  # step at which it is aborted, if any
    rid: str | None = None


def _workload(rng: random.Random, seed: int, n: int) -> list[_Req]:
    reqs = []
    for i in range(n):
        prompt = random_prompt(rng.randint(1, 150), seed=10_000 * (seed + 1) + i)
        max_new = rng.randint(1, 40)
        if rng.random() < 0.3:
            params = SamplingParams(max_new_tokens=max_new, do_sample=True, top_k=20, seed=rng.randint(0, 999))
        else:
            params = greedy(max_new, top_n_tokens=rng.choice([0, 2]))
        arrival = rng.randint(0, 25)
        abort_at = arrival + rng.randint(0, 20) if rng.random() < 0.15 else None
        reqs.append(_Req(prompt, params, arrival, abort_at))
    return reqs


@pytest.mark.parametrize("seed", range(8))
def test_random_workload(seed: int, engines: Engines, oracle: Oracle) -> None:
    rng = random.Random(seed)
    name = ORACLE_CONFIGS[seed % len(ORACLE_CONFIGS)]
    config = {
        "max_batch_total_tokens": rng.choice([192, 256, 400]),
        "max_batch_prefill_tokens": rng.choice([5, 16, 33, 128]),
        "block_size": rng.choice([4, 8, 16]),
        "max_num_seqs": rng.choice([2, 5, 64]),
    }
    llm = engines(name, **config)
    eng = llm.engine
    reqs = _workload(rng, seed, 16)
    final: dict[str, RequestOutput] = {}
    aborted: set[str] = set()
    step = 0
    while step <= 25 or eng.has_unfinished_requests():
        for r in reqs:
            if r.arrival == step:
                r.rid = eng.add_request(r.prompt, r.params)
            if r.abort_at == step and r.rid is not None and r.rid not in final:
                assert eng.abort_request(r.rid)
                aborted.add(r.rid)
        for out in eng.step():
            assert out.request_id not in final and out.request_id not in aborted
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 5000, f"engine stuck with config {config}"
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks

    roomy = engines(name)
    for r in reqs:
        if r.rid in aborted:
            continue
        out = final[r.rid]
        if r.params.greedy:
            expected = oracle.greedy(name, r.prompt, r.params.max_new_tokens)
            assert len(out.top_tokens) == len(out.token_ids)
        else:
            expected = roomy.generate([r.prompt], r.params)[0].token_ids
        assert out.token_ids == expected, f"{len(r.prompt)}-token prompt, config {config}"
