"""Every native family beyond Llama (tiny random checkpoints, family_models.py) against transformers: greedy tokens
identical to `generate` for a staggered batch with chunked prefill and preemption, logprobs within 1e-4 of
transformers' log-softmax, two tensor-parallel ranks giving the tokens of one, and bf16 within transformers' own bf16
error.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from tests.support.family_models import FAMILY_SPECS
from tests.support.oracle import Engines, Oracle, reference_model
from tests.support.tiny_models import TinyModels, greedy, random_prompt

from .test_greedy import _check_staggered

DECODER_ONLY = [name for name, spec in FAMILY_SPECS.items() if not spec.seq2seq]
TOL = 1e-4
# 16 blocks of 16 tokens for 8 requests of up to 144 tokens: preempted and recomputed; prompts prefilled 32 at a time
TIGHT = dict(max_batch_total_tokens=256, max_batch_prefill_tokens=32, block_size=16)
# T5: the decoder starts from one token, so its pool is smaller still; recomputed sequences are prefilled in chunks
T5_TIGHT = dict(max_batch_total_tokens=96, max_batch_prefill_tokens=8, block_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_tokens_and_logprobs_match_transformers_with_chunks_and_preemption(
    name: str, engines: Engines, oracle: Oracle
) -> None:
    llm = engines(name, **(T5_TIGHT if FAMILY_SPECS[name].seq2seq else TIGHT))
    before = llm.engine.scheduler.num_preemptions
    outs = _check_staggered(llm, oracle, name)
    assert llm.engine.scheduler.num_preemptions > before, "the small KV pool never preempted"
    for out in outs:
        ref = oracle.log_probs(name, out.prompt_token_ids, out.token_ids)
        chosen = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)


TP_PROMPTS = [random_prompt(n, seed) for n, seed in [(3, 1), (40, 3), (90, 5)]]


@pytest.mark.integration
@pytest.mark.parametrize("name", [n for n in DECODER_ONLY if FAMILY_SPECS[n].tp])
def test_two_ranks_give_the_tokens_of_one(name: str, tiny_models: TinyModels, engines: Engines) -> None:
    config = dict(dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=48)
    reference = engines(name, **config).generate(TP_PROMPTS, greedy(16))
    with LLM(str(tiny_models(name)), tensor_parallel_size=2, **config) as two:
        outs = two.generate(TP_PROMPTS, greedy(16))
    for out, ref in zip(outs, reference):
        assert out.token_ids == ref.token_ids
        assert out.logprobs == pytest.approx(ref.logprobs, abs=TOL)


@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_bf16_is_as_close_to_float32_as_transformers_bf16(
    name: str, tiny_models: TinyModels, engines: Engines, oracle: Oracle
) -> None:
    """bf16 through the CPU paths the plan picks (packed GEMMs, fused ops, compiled attention): the logprobs of its
    own greedy tokens stay as close to transformers' float32 ones as transformers' bf16 model's do (bf16 tokens
    themselves drift from float32 at near-ties, in both)."""
    llm = engines(name, dtype="bfloat16", max_batch_total_tokens=4096)
    seq2seq = FAMILY_SPECS[name].seq2seq
    hf16 = reference_model(tiny_models(name), torch.bfloat16, seq2seq)
    ours = theirs = 0.0
    for out in llm.generate(TP_PROMPTS, greedy(12)):
        prompt, tokens = out.prompt_token_ids, torch.tensor(out.token_ids)
        ref = oracle.log_probs(name, prompt, out.token_ids).gather(1, tokens.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            if seq2seq:
                decoder = torch.tensor([[hf16.generation_config.decoder_start_token_id, *out.token_ids[:-1]]])
                logits = hf16(torch.tensor([prompt]), decoder_input_ids=decoder).logits[0].float()
            else:
                logits = hf16(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        hf = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        ours = max(ours, (torch.tensor(out.logprobs) - ref).abs().max().item())
        theirs = max(theirs, (hf - ref).abs().max().item())
    assert ours <= max(2 * theirs, 0.05), (ours, theirs)


@pytest.mark.parametrize("name", [n for n, spec in FAMILY_SPECS.items() if spec.seq2seq])
def test_encoder_outputs_are_dropped_with_their_requests(name: str, engines: Engines) -> None:
    """T5 keeps each request's cross-attention K/V only while it runs: finished or aborted, it is released at the
    next step."""
    llm = engines(name, max_batch_total_tokens=4096)
    model, runner = llm.engine.runner.model, llm.engine.runner
    first = llm.generate(TP_PROMPTS, greedy(6))
    aborted = llm.engine.add_request(TP_PROMPTS[0], greedy(50))
    llm.engine.step()
    assert aborted in model.cross
    llm.engine.abort_request(aborted)
    second = llm.generate(TP_PROMPTS[:1], greedy(6))
    assert not {o.request_id for o in first} & set(model.cross)
    assert aborted not in model.cross
    assert set(model.cross) <= set(runner._released) | {o.request_id for o in second}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_every_family_on_cuda_matches_transformers(name: str, engines: Engines, oracle: Oracle) -> None:
    """The default GPU plan (Triton attention with the layers' options, CUDA graphs where the model allows them)."""
    config = dict(T5_TIGHT if FAMILY_SPECS[name].seq2seq else TIGHT, block_size=16)
    _check_staggered(engines(name, device="cuda", **config), oracle, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "falcon_alibi"])
def test_triton_computes_the_layer_options(name: str, engines: Engines, oracle: Oracle) -> None:
    """Soft-capping, alternating and plain sliding windows past the window, ALiBi: the Triton kernels (Triton's
    interpreter here, on the CPU) give transformers' tokens like the torch twin does."""
    pytest.importorskip("triton")
    llm = engines(name, attention_backend="triton", **TIGHT)
    assert llm.engine.runner.plan.attention == "triton"
    assert any(layer.has_options for layer in llm.engine.runner.model.attention_layers())
    outs = _check_staggered(llm, oracle, name)
    for out in outs:
        ref = oracle.log_probs(name, out.prompt_token_ids, out.token_ids)
        chosen = ref.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)
