"""The compiled decoder stack (csrc/decoder_stack.c: every layer of a step in one call) against the per-module path
it replaces, in bfloat16 on CPU. Both run the same kernels in the same order, so tokens and logprobs must be equal
bit for bit: over decodes mixed with prefill chunks, shared prefixes, preemption, qkv biases (Qwen2) and o / down
biases (Llama with attention_bias and mlp_bias). Where a compiled path is off, the stack steps aside.
"""

from __future__ import annotations

import pytest

from engine import LLM, RequestOutput
from tests.support.oracle import Engines
from tests.support.tiny_models import TinyModels, TinySpec, greedy, random_prompt

SPECS = {
    "stack_llama": TinySpec(arch="llama", seed=2, initializer_range=0.1),
    "stack_qwen2": TinySpec(arch="qwen2", seed=3, initializer_range=0.1, num_key_value_heads=1),
    "stack_biases": TinySpec(arch="llama", seed=4, initializer_range=0.1, biases=True, tie_word_embeddings=True),
}
CONFIGS = {
    "roomy": {},
    "chunked": {"max_batch_prefill_tokens": 24, "block_size": 16},
    "preempted": {"max_batch_total_tokens": 192, "block_size": 8},
}


@pytest.fixture(scope="module")
def stack_engines(tiny_models: TinyModels, engines: Engines) -> Engines:
    for name, spec in SPECS.items():
        tiny_models(name, spec)
    return engines


def _generate(llm: LLM) -> list[RequestOutput]:
    shared = random_prompt(40, seed=500)
    prompts = [random_prompt(n, seed=510 + n) for n in (1, 7, 16, 33, 90)]
    prompts += [shared + random_prompt(n, seed=520 + n) for n in (2, 11, 30)]
    return llm.generate(prompts, greedy(14))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", SPECS)
def test_the_stack_equals_the_per_module_path(name: str, config: dict, stack_engines: Engines) -> None:
    stacked = stack_engines(name, dtype="bfloat16", **config)
    modules = stack_engines(name, dtype="bfloat16", cpu_decoder_stack=False, **config)
    assert stacked.engine.runner.decoder_stack and not modules.engine.runner.decoder_stack
    got, want = _generate(stacked), _generate(modules)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.logprobs == w.logprobs  # exact: the same kernels in the same order


def test_the_stack_steps_aside_without_the_compiled_paths(stack_engines: Engines) -> None:
    assert not stack_engines("stack_llama", dtype="float32").engine.runner.decoder_stack
    assert not stack_engines("stack_llama", dtype="bfloat16", cpu_fused_ops=False).engine.runner.decoder_stack
    assert not stack_engines("stack_llama", dtype="bfloat16", cpu_gemm=False).engine.runner.decoder_stack
    odd = stack_engines("stack_llama", dtype="bfloat16", block_size=1, max_batch_total_tokens=512)
    assert not odd.engine.runner.paired and not odd.engine.runner.decoder_stack


def test_the_stack_builds_without_avx512(portable_build) -> None:
    """csrc/decoder_stack.c has no vector code of its own: it builds (-Werror) wherever its kernels do."""
    assert portable_build("decoder_stack").decoder_stack
