"""bfloat16 on CPU: the paired-layout kernel (decode rows and prefill chunks in one call per layer) against the
pure-torch twin on the plain layout, over the same prompts: around block edges, chunked prefill, preemption, prefixes
served from the prefix cache (also within one step), and a block size the paired layout cannot take (the plain
kernel runs instead).

Tiny random models are chaotic in bf16 (two float32-exact paths differ in rounding only, yet greedy runs part ways
after a near-tie), so the model here is drawn with small weights, and the checks allow some prompts to part ways.
"""

from __future__ import annotations

import pytest

from engine import LLM, RequestOutput
from engine.layers import cpu_gemm
from tests.support.oracle import Engines
from tests.support.tiny_models import TinyModels, TinySpec, greedy, random_prompt

MODEL = "llama_gqa_soft"
LENGTHS = (1, 5, 16, 17, 40, 64, 97, 120)


@pytest.fixture(scope="module")
def soft_engines(tiny_models: TinyModels, engines: Engines) -> Engines:
    tiny_models(
        MODEL, TinySpec(arch="llama", num_attention_heads=4, num_key_value_heads=2, seed=2, initializer_range=0.1)
    )
    return engines


def _generate(llm: LLM) -> list[RequestOutput]:
    prompts = [random_prompt(n, seed=300 + n) for n in LENGTHS]
    shared = random_prompt(70, seed=399)
    first = llm.generate(prompts, greedy(16))
    one = llm.generate([shared + prompts[0][:9]], greedy(16))
    cached = llm.generate([shared + p[:9] for p in prompts[1:4]], greedy(16))  # the shared prefix is in the cache
    fresh = random_prompt(80, seed=398)  # shared by requests admitted in one step: the first fills it for all
    together = llm.generate([fresh + p[:7] for p in prompts[4:8]], greedy(16))
    return first + one + cached + together


def _agree(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    """Greedy tokens equal for most prompts; logprobs close wherever both saw the same tokens so far (the first
    token's come from prefill alone)."""
    same = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
    assert same >= 0.65 * len(want), f"only {same} of {len(want)} greedy outputs agree"
    for g, w in zip(got, want):
        assert abs(g.logprobs[0] - w.logprobs[0]) < 0.05
        for step, (a, b) in enumerate(zip(g.token_ids, w.token_ids)):
            assert abs(g.logprobs[step] - w.logprobs[step]) < 0.1
            if a != b:
                break


@pytest.mark.parametrize(
    "config",
    [{}, {"max_batch_prefill_tokens": 24, "block_size": 16}, {"max_batch_total_tokens": 192, "block_size": 8}],
    ids=["roomy", "chunked", "preempted"],
)
@pytest.mark.slow
def test_paired_kernel_agrees_with_the_twin(config: dict, soft_engines: Engines) -> None:
    kernel = soft_engines(MODEL, dtype="bfloat16", **config)
    twin = soft_engines(MODEL, dtype="bfloat16", cpu_attention_kernels=False, **config)
    assert kernel.engine.runner.paired and not twin.engine.runner.paired
    assert kernel.engine.runner.model.attention_layers()[0].k_cache.dim() == 5
    _agree(_generate(kernel), _generate(twin))


@pytest.mark.slow
def test_odd_block_size_keeps_the_plain_layout(soft_engines: Engines) -> None:
    config = {"dtype": "bfloat16", "block_size": 1, "max_batch_total_tokens": 512}
    plain = soft_engines(MODEL, **config)
    assert plain.engine.runner.decode_kernel and not plain.engine.runner.paired
    _agree(_generate(plain), _generate(soft_engines(MODEL, cpu_attention_kernels=False, **config)))


@pytest.mark.slow
def test_every_compiled_path_agrees_with_the_torch_paths(soft_engines: Engines) -> None:
    """bf16 with the GEMM kernel, fused ops and paired attention (the CPU default) against oneDNN matmuls, torch
    element-wise ops and the attention twin, all at once."""
    compiled = soft_engines(MODEL, dtype="bfloat16", cpu_gemm=True)  # the default, except on AMX CPUs
    torch_only = soft_engines(MODEL, dtype="bfloat16", cpu_attention_kernels=False, cpu_fused_ops=False, cpu_gemm=False)
    runner = compiled.engine.runner
    assert runner.fused_ops and runner.paired and runner.decoder_stack and not torch_only.engine.runner.fused_ops
    assert isinstance(runner.model.model.layers[0].mlp.down_proj.packed, cpu_gemm.PackedWeight)
    assert not isinstance(torch_only.engine.runner.model.model.layers[0].mlp.down_proj.packed, cpu_gemm.PackedWeight)
    _agree(_generate(compiled), _generate(torch_only))
