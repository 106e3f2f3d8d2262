"""On a CUDA GPU (skipped without one; tests/gpu/run.sh runs them when a GPU is lent): every available attention
backend gives transformers' tokens in float32 over mixed batches with chunked prefill, preemption and cached prefixes;
CUDA graphs on and off give identical tokens and logprobs; bf16 agrees with transformers bf16 as the CPU tests do;
the KV cache is sized by the profile run within CUDA_MEMORY_FRACTION.
"""

from __future__ import annotations

import gc

import pytest
import torch

from engine import LLM, SamplingParams
from engine.plan import flash_attn_available
from tests.support.oracle import Engines, Oracle, run_to_completion
from tests.support.tiny_models import greedy, random_prompt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODEL = "llama_gqa"
LENGTHS = (1, 5, 16, 17, 40, 64, 97, 120)
# flash-attn computes in 16 bits only: it is checked in bfloat16, next to Triton
FLASH = ["flash_attn"] if torch.cuda.is_available() and not flash_attn_available(torch.device("cuda")) else []
BACKENDS = ["torch", "triton"]
CONFIGS = {
    "roomy": {},
    "chunked": {"max_batch_prefill_tokens": 24},
    "preempted": {"max_batch_total_tokens": 192, "max_num_seqs": 8},
}


def _prompts() -> list[list[int]]:
    return [random_prompt(n, seed=300 + n) for n in LENGTHS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_float32_tokens_equal_transformers(backend: str, config: str, engines: Engines, oracle: Oracle) -> None:
    llm = engines(MODEL, device="cuda", attention_backend=backend, block_size=16, **CONFIGS[config])
    assert llm.engine.runner.plan.attention == backend
    prompts = _prompts()
    shared = random_prompt(70, seed=399)
    prompts += [shared + p[:9] for p in prompts[:4]]  # a cached prefix for the later ones
    outs = llm.generate(prompts, greedy(16))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == oracle.greedy(MODEL, prompt, 16)
        want = oracle.log_probs(MODEL, prompt, out.token_ids).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)


def test_cuda_graphs_change_nothing(engines: Engines) -> None:
    graphs = engines(MODEL, device="cuda", block_size=16, max_num_seqs=16)
    eager = engines(MODEL, device="cuda", block_size=16, max_num_seqs=16, cuda_graphs=False)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    prompts = _prompts()
    sampled = [greedy(24)] * 4 + [greedy(24, repetition_penalty=1.2)] * 2
    sampled += [SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2)]
    a, b = graphs.generate(prompts, sampled), eager.generate(prompts, sampled)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["triton", *FLASH])
def test_bf16_agrees_with_transformers_bf16(backend: str, engines: Engines, oracle: Oracle) -> None:
    llm = engines(MODEL, device="cuda", dtype="bfloat16", block_size=16, attention_backend=backend)
    model = oracle.model(MODEL).to("cuda", torch.bfloat16)
    try:
        same = 0
        prompts = _prompts()
        outs = llm.generate(prompts, greedy(16))
        for prompt, out in zip(prompts, outs):
            ref = model.generate(
                torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=16, eos_token_id=None,
                pad_token_id=2,
            )[0, len(prompt):].tolist()  # fmt: skip
            same += out.token_ids == ref
        assert same >= 0.65 * len(prompts), f"only {same} of {len(prompts)} greedy outputs agree"
    finally:
        model.to("cpu", torch.float32)


def test_kv_cache_fills_the_memory_fraction(tiny_models) -> None:
    """The profile-sized cache: more blocks for a larger fraction, and the start-up state fits the fraction."""
    path = str(tiny_models(MODEL))
    sizes = []
    for fraction in (0.3, 0.5):
        with LLM(path, device="cuda", gpu_memory_utilization=fraction, cuda_graphs=False) as llm:
            sizes.append(llm.engine.runner.num_blocks)
            total = torch.cuda.get_device_properties(0).total_memory
            assert torch.cuda.memory_reserved(0) <= fraction * total * 1.02
            llm.generate([random_prompt(30, seed=1)], greedy(4))
        del llm  # its cache must be gone before the next engine sizes (the profile counts all allocated memory)
        gc.collect()
        torch.cuda.empty_cache()
    assert sizes[1] > sizes[0] > 0


def test_the_engine_loop_runs_on_device(engines: Engines) -> None:
    """A long decode through the graph path produces its tokens step by step, the cache never leaks."""
    llm = engines(MODEL, device="cuda", block_size=16, max_num_seqs=16)
    bm = llm.engine.block_manager
    for p in _prompts():
        llm.engine.add_request(p, greedy(40))
    outs = [o for o in run_to_completion(llm) if o.finished]
    assert len(outs) == len(LENGTHS) and all(o.finish_reason in ("length", "eos_token") for o in outs)
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("graphs", [True, False])
def test_a_step_never_waits_on_the_device(graphs: bool, engines: Engines) -> None:
    """The forward pass and the sampler queue work without a host sync (no .item(), .tolist(), pageable copies):
    CUDA's sync debug mode raises on any; the sampler's one device->host copy at the end is the only sync."""
    from engine.sampler import SamplingRequest

    llm = engines(MODEL, device="cuda", block_size=16, max_num_seqs=16, cuda_graphs=graphs)
    engine = llm.engine
    for p in _prompts()[:4]:
        engine.add_request(p, SamplingParams(max_new_tokens=8, do_sample=True, top_p=0.9, repetition_penalty=1.1))
    engine.step()  # the prefill
    batch = engine.scheduler.schedule()
    step = engine.runner.prepare(batch)
    assert step.is_decode_only
    rows = [SamplingRequest(i.seq.sampling_params, i.seq.all_token_ids, torch.Generator("cuda")) for i in batch.decodes]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = engine.runner.run(step)
        engine.sampler._process(logits.float(), _rows(engine, rows, logits))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    engine.scheduler.abandon(batch)
    for rid in list(engine._requests):
        engine.abort_request(rid)


def _rows(engine, rows, logits):
    from engine.sampler import _Rows

    return _Rows.build(list(range(len(rows))), rows, logits.shape[1], logits.device)
