"""Streaming: the `new_text` pieces of the incremental engine join exactly to the final text and to
tokenizer.decode(token_ids), also when tokens split multi-byte UTF-8 characters (no piece ever holds a
U+FFFD for a character that is completed later), and for many requests interleaved in one engine.
"""

from __future__ import annotations

import pytest

from tests.support.oracle import Engines, Oracle, run_to_completion
from tests.support.tiny_models import CHAIN_BYTES, CHAIN_TEXT, ORACLE_CONFIGS, greedy, random_prompt
from tests.support.tiny_tokenizer import byte_token_id


@pytest.mark.parametrize(
    "config",
    [{}, {"max_batch_total_tokens": 160, "max_batch_prefill_tokens": 24, "block_size": 16}],
    ids=["roomy", "chunked-preempted"],
)
def test_pieces_join_to_final_text_for_interleaved_requests(
    config: dict, engines: Engines, oracle: Oracle, tokenizer
) -> None:
    for name in ORACLE_CONFIGS:
        llm = engines(name, **config)
        prompts = [random_prompt(n, seed=400 + n) for n in (1, 4, 9, 30, 70)]
        ids = [llm.engine.add_request(p, greedy(40)) for p in prompts]
        pieces: dict[str, list[str]] = {rid: [] for rid in ids}
        final = {}
        for out in run_to_completion(llm):
            pieces[out.request_id].append(out.new_text)
            assert (out.text is None) != out.finished  # the whole text comes once, on the final output
            if out.finished:
                final[out.request_id] = out
        for rid, prompt in zip(ids, prompts):
            out = final[rid]
            assert out.token_ids == oracle.greedy(name, prompt, 40)
            assert "".join(pieces[rid]) == out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_multibyte_characters_split_over_tokens(engines: Engines, oracle: Oracle, tokenizer) -> None:
    prompt = [byte_token_id(tokenizer, CHAIN_BYTES[-1])]
    n = 2 * len(CHAIN_BYTES)
    expected_ids = [byte_token_id(tokenizer, b) for b in CHAIN_BYTES * 2]
    assert oracle.greedy("byte_chain", prompt, n) == expected_ids
    # the tokens really split characters: most of them alone are not valid UTF-8
    assert sum("\ufffd" in tokenizer.decode([t]) for t in expected_ids) >= n // 2

    llm = engines("byte_chain")
    rid = llm.engine.add_request(prompt, greedy(n))
    outs = list(run_to_completion(llm))
    assert all(o.request_id == rid for o in outs) and len(outs) == n
    pieces = [o.new_text for o in outs]
    assert outs[-1].token_ids == expected_ids and outs[-1].finish_reason == "length"
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == outs[-1].text == CHAIN_TEXT * 2 == tokenizer.decode(expected_ids)
    # one piece per completed character, emitted at the step of its last byte
    assert [p for p in pieces if p] == list(CHAIN_TEXT * 2)
    ends = {len(CHAIN_TEXT[: i + 1].encode()) for i in range(len(CHAIN_TEXT))}
    assert [i for i, p in enumerate(pieces, start=1) if p] == sorted(ends | {e + len(CHAIN_BYTES) for e in ends})


def test_text_ending_in_an_incomplete_character_is_flushed(engines: Engines, tokenizer) -> None:
    """Stopping in the middle of a character: the final piece carries the replacement character,
    exactly as tokenizer.decode renders the ids."""
    prompt = [byte_token_id(tokenizer, CHAIN_BYTES[-1])]
    llm = engines("byte_chain")
    for n in (1, 4, 13, 15):
        rid = llm.engine.add_request(prompt, greedy(n))
        outs = [o for o in run_to_completion(llm) if o.request_id == rid]
        final = outs[-1]
        assert final.finish_reason == "length" and len(final.token_ids) == n
        decoded = tokenizer.decode(final.token_ids, skip_special_tokens=True)
        assert decoded.endswith("\ufffd")
        assert "".join(o.new_text for o in outs) == final.text == decoded


def test_each_output_is_a_delta_of_its_step(engines: Engines) -> None:
    """An output holds only what its step produced (no copy grows with the output); the deltas join to the whole
    output, which the final one carries once."""
    llm = engines("llama_gqa")
    rid = llm.engine.add_request(random_prompt(7, seed=450), greedy(6, top_n_tokens=2))
    outs = [o for o in run_to_completion(llm) if o.request_id == rid]
    assert len(outs) == 6
    final = outs[-1]
    for step, out in enumerate(outs, start=1):
        assert len(out.new_token_ids) == len(out.new_logprobs) == len(out.new_top_tokens) == 1, f"step {step}"
        assert out.num_generated_tokens == step and out.finished == (step == 6)
        if not out.finished:
            assert out.token_ids is None and out.text is None and out.logprobs is None
    assert [t for o in outs for t in o.new_token_ids] == final.token_ids
    assert [lp for o in outs for lp in o.new_logprobs] == final.logprobs
    assert [tt for o in outs for tt in o.new_top_tokens] == final.top_tokens
    assert "".join(o.new_text for o in outs) == final.text
    assert final.prompt_token_ids == random_prompt(7, seed=450)
