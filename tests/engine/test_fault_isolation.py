"""One request's failure is its own: a bad sampling row, a failing detokenizer or a batched sampler that raises fail
(at most) the request concerned, with finish_reason "error" and a message; every other request of the batch goes on
and still matches transformers; the failed request's KV blocks go back. Device errors still fail the step.
"""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.faults import is_device_fault
from engine.sampler import NON_FINITE, Sampler
from tests.support.oracle import Engines, Oracle, run_to_completion
from tests.support.tiny_models import greedy, random_prompt

MODEL = "llama_gqa"


def _prompts() -> list[list[int]]:
    return [random_prompt(n, seed=1200 + n) for n in (12, 40, 25)]


def _collect(llm) -> dict[str, object]:
    return {out.request_id: out for out in run_to_completion(llm) if out.finished}


def _poison_row(llm, victim: str, value: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the victim's logits row non-finite in every step it samples (as a numerically broken row would)."""
    engine = llm.engine
    execute = engine.runner.execute

    def poisoned(batch):
        logits = execute(batch)
        rows = [item.seq.request_id for item in batch.scheduled if item.sample]
        if victim in rows:
            logits = logits.clone()
            logits[rows.index(victim), 3] = value
        return logits

    monkeypatch.setattr(engine.runner, "execute", poisoned)


@pytest.mark.parametrize(
    ("value", "victim_params"),
    [
        (float("nan"), SamplingParams(max_new_tokens=8, do_sample=True, seed=1)),
        (float("inf"), SamplingParams(max_new_tokens=8, do_sample=True, seed=1)),
        (float("nan"), greedy(8, repetition_penalty=1.3)),
    ],
)
def test_a_non_finite_row_fails_only_its_request(
    engines: Engines, oracle: Oracle, value: float, victim_params: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = engines(MODEL, block_size=16)
    engine, bm = llm.engine, llm.engine.block_manager
    prompts = _prompts()
    ids = [engine.add_request(p, greedy(10)) for p in prompts[:2]]
    victim = engine.add_request(prompts[2], victim_params)
    _poison_row(llm, victim, value, monkeypatch)
    done = _collect(llm)
    assert done[victim].finish_reason == "error"
    assert NON_FINITE in done[victim].error
    for rid, prompt in zip(ids, prompts):
        assert done[rid].error is None
        assert done[rid].token_ids == oracle.greedy(MODEL, prompt, 10)
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.has_unfinished_requests()


def test_a_failing_detokenizer_fails_only_its_request(
    engines: Engines, oracle: Oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = engines(MODEL, block_size=16)
    engine = llm.engine
    prompts = _prompts()
    ids = [engine.add_request(p, greedy(10)) for p in prompts]
    engine.step()  # every request has its first token

    def broken(token_ids: list[int]) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken detokenizer")

    monkeypatch.setattr(engine._requests[ids[1]].detokenizer, "add", broken)
    done = _collect(llm)
    assert done[ids[1]].finish_reason == "error" and "UnicodeDecodeError" in done[ids[1]].error
    for i in (0, 2):
        assert done[ids[i]].token_ids == oracle.greedy(MODEL, prompts[i], 10)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_raising_batched_sampler_falls_back_row_by_row(
    engines: Engines, oracle: Oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the batched pass that one request's parameters trigger: the step is sampled by the per-row twin,
    where only the offending row fails."""
    llm = engines(MODEL, block_size=16)
    engine = llm.engine
    prompts = _prompts()
    ids = [engine.add_request(p, greedy(6)) for p in prompts[:2]]
    victim = engine.add_request(prompts[2], greedy(6, top_n_tokens=2))
    batched, one = Sampler.__call__, Sampler.one

    def fragile_batch(self, logits, requests):
        if any(r.params.top_n_tokens for r in requests):
            raise IndexError("a batched-path bug")
        return batched(self, logits, requests)

    def fragile_row(self, logits, request):
        if request.params.top_n_tokens:
            raise IndexError("the same bug, row by row")
        return one(self, logits, request)

    monkeypatch.setattr(Sampler, "__call__", fragile_batch)
    monkeypatch.setattr(Sampler, "one", fragile_row)
    done = _collect(llm)
    assert done[victim].finish_reason == "error" and "IndexError" in done[victim].error
    for rid, prompt in zip(ids, prompts):
        assert done[rid].token_ids == oracle.greedy(MODEL, prompt, 6)


def test_a_device_error_still_fails_the_step(engines: Engines, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = engines(MODEL, block_size=16)
    engine = llm.engine
    rid = engine.add_request(_prompts()[0], greedy(4))

    def device_error(self, logits, requests):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Sampler, "__call__", device_error)
    with pytest.raises(RuntimeError, match="CUDA error"):
        engine.step()
    engine.abort_request(rid)  # the server exits here; the shared test engine is cleaned up instead


def test_extreme_sampling_values_answer_without_failing(engines: Engines, oracle: Oracle) -> None:
    """The values that used to crash the engine: a temperature of 1e-300 is argmax, a repetition penalty of 1e-300 acts
    as its bound; both requests finish normally next to a plain one."""
    llm = engines(MODEL, block_size=16)
    prompts = _prompts()
    params = [
        SamplingParams(max_new_tokens=8, temperature=1e-300),
        SamplingParams(max_new_tokens=8, do_sample=True, repetition_penalty=1e-300, seed=3),
        SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e300, seed=4),
    ]
    outs = llm.generate(prompts, params)
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert outs[0].token_ids == oracle.greedy(MODEL, prompts[0], 8)


@pytest.mark.parametrize(
    ("error", "device"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (RuntimeError("NCCL communicator was aborted"), True),
        (KeyboardInterrupt(), True),
        (ValueError("bad row"), False),
        (IndexError("index 5 is out of bounds"), False),
    ],
)
def test_device_fault_classification(error: BaseException, device: bool) -> None:
    assert is_device_fault(error) is device
