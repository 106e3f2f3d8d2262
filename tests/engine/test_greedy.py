"""Greedy decoding is token-exact against transformers `generate`, for every tiny architecture, with
requests joining mid-flight, with chunked prefill, with a KV pool small enough to force preemption
and with few sequence slots.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from engine import LLM, RequestOutput
from tests.support.oracle import Engines, Oracle, run_to_completion
from tests.support.tiny_models import ORACLE_CONFIGS, greedy, random_prompt
from tests.support.tiny_tokenizer import EOS_ID

PROMPT_LENGTHS = (1, 5, 16, 17, 40, 64, 97, 120)  # around block (16) and chunk (32) boundaries
MAX_NEW = (24, 17, 24, 9, 24, 31, 16, 24)


def _prompts() -> list[list[int]]:
    return [random_prompt(n, seed=100 + i) for i, n in enumerate(PROMPT_LENGTHS)]


def _check_staggered(llm: LLM, oracle: Oracle, name: str) -> list[RequestOutput]:
    """Add 4 requests, step a few times, add 4 more, run to the end; compare each with the oracle."""
    eng = llm.engine
    prompts = _prompts()
    pieces: dict[str, list[int]] = {}
    final: dict[str, RequestOutput] = {}

    def consume(outputs: Iterable[RequestOutput]) -> None:
        for out in outputs:
            pieces.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert out.request_id not in final, f"output for {out.request_id} after it finished"
            if out.finished:
                final[out.request_id] = out

    ids = [eng.add_request(p, greedy(n)) for p, n in zip(prompts[:4], MAX_NEW[:4])]
    for _ in range(4):
        consume(eng.step())
    assert any(pieces.get(rid) for rid in ids), "no request of the first wave produced a token"
    assert not all(rid in final for rid in ids), "the first wave finished before the second joined"
    ids += [eng.add_request(p, greedy(n)) for p, n in zip(prompts[4:], MAX_NEW[4:])]
    consume(run_to_completion(llm))

    assert set(final) == set(ids)
    for rid, prompt, n in zip(ids, prompts, MAX_NEW):
        out = final[rid]
        expected = oracle.greedy(name, prompt, n)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverges from transformers"
        assert pieces[rid] == out.token_ids
        assert len(out.logprobs) == len(out.token_ids)
        assert out.finish_reason == ("eos_token" if expected[-1] == EOS_ID else "length")
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time == m.finished_time
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    return [final[rid] for rid in ids]


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
def test_greedy_matches_transformers_staggered(name: str, engines: Engines, oracle: Oracle) -> None:
    llm = engines(name)
    before = llm.engine.scheduler.num_preemptions
    outs = _check_staggered(llm, oracle, name)
    assert llm.engine.scheduler.num_preemptions == before  # a roomy pool never preempts
    assert all(o.metrics.num_preemptions == 0 for o in outs)


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
def test_greedy_matches_transformers_with_preemption_and_chunked_prefill(
    name: str, engines: Engines, oracle: Oracle
) -> None:
    # 16 blocks of 16 tokens for 8 requests of up to 144 tokens: requests must be preempted and recomputed;
    # 32 prefill tokens per step: every prompt longer than that is prefilled in chunks.
    llm = engines(name, max_batch_total_tokens=256, max_batch_prefill_tokens=32, block_size=16)
    before = llm.engine.scheduler.num_preemptions
    outs = _check_staggered(llm, oracle, name)
    preemptions = llm.engine.scheduler.num_preemptions - before
    assert preemptions > 0, "the small KV pool never preempted"
    assert sum(o.metrics.num_preemptions for o in outs) == preemptions  # each one is reported on its request


@pytest.mark.parametrize("name", ORACLE_CONFIGS)
def test_compiled_and_torch_paths_match_transformers(name: str, engines: Engines, oracle: Oracle) -> None:
    """The compiled CPU paths (decode kernel, fused ops: the default where a C compiler exists), each alone, and
    their pure-torch twins."""
    for kernel, fused in ((True, True), (True, False), (False, True), (False, False)):
        llm = engines(
            name, cpu_attention_kernels=kernel, cpu_fused_ops=fused, max_batch_total_tokens=256, block_size=16
        )
        assert llm.engine.runner.decode_kernel is kernel and llm.engine.runner.fused_ops is fused
        _check_staggered(llm, oracle, name)


@pytest.mark.parametrize(
    "config",
    [
        {"max_batch_prefill_tokens": 7, "block_size": 8},
        {"max_num_seqs": 3, "block_size": 32},
        {"max_batch_total_tokens": 160, "max_batch_prefill_tokens": 48, "block_size": 4},
        {"max_num_seqs": 1},
        {"block_size": 1, "max_batch_total_tokens": 200, "max_batch_prefill_tokens": 50},
    ],
    ids=["tiny_chunks", "three_seqs", "tiny_blocks_preempt", "one_seq", "block_size_1"],
)
def test_greedy_matches_transformers_other_schedules(config: dict, engines: Engines, oracle: Oracle) -> None:
    _check_staggered(engines("llama_gqa", **config), oracle, "llama_gqa")


def test_text_prompts_match_transformers(engines: Engines, oracle: Oracle, tokenizer) -> None:
    texts = ["Hello", "héllo wörld ünïcode 東京 日本語 😀 emoji", "The capital of France is", "x"]
    llm = engines("qwen2")
    outs = llm.generate(texts, greedy(12))
    for text, out in zip(texts, outs):
        prompt = tokenizer(text)["input_ids"]
        assert prompt[0] == tokenizer.bos_token_id
        assert out.prompt_token_ids == prompt
        assert out.token_ids == oracle.greedy("qwen2", prompt, 12)
        assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_chat_uses_the_tokenizers_template(engines: Engines, oracle: Oracle, tokenizer) -> None:
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 東京 😀"}],
    ]
    llm = engines("llama_tied")
    outs = llm.chat(conversations, greedy(10))
    for messages, out in zip(conversations, outs):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == oracle.greedy("llama_tied", prompt, 10)
    single = llm.chat(conversations[0], greedy(10))
    assert [o.token_ids for o in single] == [outs[0].token_ids]
