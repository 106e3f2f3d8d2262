"""Quantized models through the engine, on tiny checkpoints: every method's logprobs equal transformers in float32
on the same weights dequantized (the twins, 1e-4) and stay close on the CPU kernels in bfloat16; greedy tokens
equal transformers loading the quantized checkpoint itself wherever it can on the CPU (bitsandbytes, FP8 via
compressed-tensors; GPTQ and AWQ through GPTQModel, recorded); quantized weights take their share of the memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from engine import LLM
from engine.quant import bnb, cpu_kernel
from engine.quant.int_weight import default_group_size
from engine.quant.int_weight import quantize as rtn
from tests.quant.checkpoints import is_linear
from tests.quant.quant_models import QuantModels
from tests.support.tiny_models import greedy, random_prompt

PROMPTS = [random_prompt(n, seed) for n, seed in [(4, 31), (19, 32), (41, 33)]]
NEW = 10
CHECKPOINTS = ("gptq", "gptq_act", "awq", "fp8")
AT_LOAD = ("int4", "int8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
CONFIG = dict(max_batch_total_tokens=4096)


def _model(quant_models: QuantModels, method: str) -> tuple[str, str | None]:
    """(model path, QUANTIZE value) of a method."""
    if method in CHECKPOINTS:
        return str(quant_models(method)), None
    return str(quant_models.tiny_models("llama_gqa")), method


def _reference_state(
    quant_models: QuantModels, method: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor] | None:
    """The weights a method serves (in an engine of `dtype`), dequantized; None: the checkpoint's own."""
    if method in CHECKPOINTS:
        return None
    state = {}
    for name, w in quant_models.base_state().items():
        if not is_linear(name):
            state[name] = w
        elif method in ("int4", "int8"):
            state[name] = rtn(w, int(method[-1]), default_group_size(w.shape[1])).dequantize()
        else:
            state[name] = bnb.dequantize(bnb.quantize(w, method, torch.device("cpu"), dtype))  # quantized in dtype
    return state


def _reference(quant_models: QuantModels, method: str, dtype: torch.dtype = torch.float32):
    bnb_dtype = method.startswith("bitsandbytes") and dtype != torch.float32
    key = f"{method}-{dtype}" if bnb_dtype else method
    return quant_models.reference(key, _reference_state(quant_models, method, dtype), source=method)


@torch.no_grad()
def _ref_log_probs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], dim=-1)


def _chosen_log_probs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated)]: the reference model's log-probability of each generated token, teacher-forced."""
    lp = _ref_log_probs(model, prompt, generated)
    return lp.gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1)


@pytest.mark.slow
@pytest.mark.parametrize("method", CHECKPOINTS + AT_LOAD)
def test_twins_give_the_dequantized_weights_logprobs(method: str, quant_models: QuantModels) -> None:
    path, quantize = _model(quant_models, method)
    llm = LLM(path, dtype="float32", quantize=quantize, quant_kernel=False, **CONFIG)
    ref = _reference(quant_models, method)
    outs = llm.generate(PROMPTS, greedy(NEW, top_n_tokens=4))
    for prompt, out in zip(PROMPTS, outs):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=1, pad_token_id=2)
        assert out.token_ids == want[0, len(prompt) :].tolist()
        lp = _ref_log_probs(ref, prompt, out.token_ids)
        chosen = lp.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=1e-4, rtol=0)
        for step, tops in enumerate(out.top_tokens):
            torch.testing.assert_close(torch.tensor([v for _, v in tops]), torch.topk(lp[step], 4).values, atol=1e-4,
                                       rtol=0)  # fmt: skip
    llm.close()


# mean |logprob| difference per token, bfloat16 activations against float32 (measured 0.015-0.045 here); LLM.int8
# also rounds activations to int8
BF16_TOL = {"bitsandbytes": 0.12}


@pytest.mark.slow
@pytest.mark.parametrize("method", CHECKPOINTS + AT_LOAD)
def test_kernels_in_bfloat16_follow_the_dequantized_weights(method: str, quant_models: QuantModels) -> None:
    """The CPU kernel (int formats; bitsandbytes' own; FP8 dequantized at load) in a bfloat16 engine: teacher-forced
    log-probabilities of its own tokens within BF16_TOL (mean) of float32 on the dequantized weights."""
    path, quantize = _model(quant_models, method)
    llm = LLM(path, dtype="bfloat16", quantize=quantize, **CONFIG)
    plan = llm.engine.runner.plan.quant
    cpu = cpu_kernel.kernel_name()  # cpu_amx where this CPU has AMX tiles
    kernel = {"fp8": "dequantized"}.get(method, "bitsandbytes" if method.startswith("bits") else cpu)
    assert plan.endswith(f"on {kernel}"), plan
    ref = _reference(quant_models, method, torch.bfloat16)
    outs = llm.generate(PROMPTS, greedy(NEW))
    for prompt, out in zip(PROMPTS, outs):
        chosen = _chosen_log_probs(ref, prompt, out.token_ids)
        assert (torch.tensor(out.logprobs) - chosen).abs().mean() < BF16_TOL.get(method, 0.08)
    llm.close()


# Recorded: transformers 5.24 + GPTQModel 7.6.0 (its TorchAtenLinear / TorchAtenAwqLinear CPU kernels, float32)
# loading these very checkpoints (QuantModels: seeded, written offline), greedy, NEW tokens per prompt. GPTQModel is
# not a test dependency (a source build that pins numpy and pulls datasets / pyarrow); docs/quantization.md tells
# how to record these again.
GPTQMODEL_TOKENS = {
    "gptq": [[94, 10, 159, 285, 5, 276, 226, 155, 94, 206], [380, 173, 222, 363, 306, 179, 364, 308, 179, 158],
             [377, 281, 319, 161, 233, 368, 182, 313, 78, 157]],
    "gptq_act": [[255, 305, 81, 47, 268, 363, 369, 263, 48, 188], [179, 313, 306, 225, 391, 60, 189, 191, 179, 101],
                 [377, 281, 276, 271, 380, 298, 358, 229, 351, 189]],
    "awq": [[94, 10, 159, 285, 5, 276, 226, 155, 94, 206], [380, 173, 222, 363, 306, 179, 364, 308, 179, 158],
            [377, 281, 319, 161, 233, 368, 182, 313, 78, 157]],
}  # fmt: skip


@pytest.mark.parametrize("method", list(GPTQMODEL_TOKENS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gptq_and_awq_tokens_equal_gptqmodel(method: str, dtype: str, quant_models: QuantModels) -> None:
    """Equal tokens; where the two part, a near-tie: float32 on the dequantized weights scores both choices within
    NEAR_TIE (GPTQModel's CPU kernels sum in another order; ours may run in bfloat16)."""
    llm = LLM(str(quant_models(method)), dtype=dtype, **CONFIG)
    ref = _reference(quant_models, method)
    for prompt, out, want in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW)), GPTQMODEL_TOKENS[method]):
        split = next((i for i, (a, b) in enumerate(zip(out.token_ids, want)) if a != b), None)
        if split is None:
            continue
        lp = _ref_log_probs(ref, prompt, out.token_ids[: split + 1])[split]
        assert abs(lp[out.token_ids[split]] - lp[want[split]]) < NEAR_TIE[dtype], (split, out.token_ids, want)
    llm.close()


NEAR_TIE = {"float32": 0.02, "bfloat16": 0.1}  # bfloat16 activations move logprobs by a few 1e-2 (BF16_TOL)


def _hf_quantized(quant_models: QuantModels, method: str):
    if method == "fp8":  # compressed-tensors' float-quantized format, decompressed by transformers
        return AutoModelForCausalLM.from_pretrained(quant_models("fp8"), dtype=torch.float32, device_map="cpu")
    bnb_config = {
        "bitsandbytes": BitsAndBytesConfig(load_in_8bit=True),
        "bitsandbytes-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32),
        "bitsandbytes-fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                               bnb_4bit_compute_dtype=torch.float32),
    }[method]  # fmt: skip
    path = quant_models.tiny_models("llama_gqa")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                quantization_config=bnb_config)  # fmt: skip


@pytest.mark.parametrize("method", ["fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_greedy_tokens_equal_transformers_on_the_quantized_checkpoint(method: str, quant_models: QuantModels) -> None:
    path, quantize = _model(quant_models, method)
    llm = LLM(path, dtype="float32", quantize=quantize, **CONFIG)
    hf = _hf_quantized(quant_models, method).eval()
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW))):
        if method.startswith("bitsandbytes"):
            # LLM.int8 rounds activations to int8 (float32 noise far below any logit gap can flip a rounding, and a
            # near-tie with it); bitsandbytes' 4-bit matmul of one row (transformers' decode) is a fused GEMV whose
            # sums differ from its batched path, and its CPU matmul is itself ~1e-2 off the float32 product of its
            # own dequantized weights: the transformers model scores our tokens (teacher-forced) instead
            lp = _ref_log_probs(hf, prompt, out.token_ids)
            chosen = lp.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
            assert (torch.tensor(out.logprobs) - chosen).abs().max() < 0.1
            assert (lp.max(1).values - chosen).max() < 0.1  # each token transformers' choice, or a near-tie
            continue
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=1, pad_token_id=2)
        assert out.token_ids == want[0, len(prompt) :].tolist()
    llm.close()


def test_prequantized_bitsandbytes_checkpoints_load(quant_models: QuantModels, tmp_path: Path) -> None:
    """Checkpoints transformers saved with bitsandbytes (4-bit and LLM.int8) serve as the same mode, same tokens."""
    for method in ("bitsandbytes-nf4", "bitsandbytes"):
        hf = _hf_quantized(quant_models, method)
        saved = tmp_path / method
        hf.save_pretrained(saved)
        quant_models.tiny_models.tokenizer.save_pretrained(saved)
        from_checkpoint = LLM(str(saved), dtype="float32", **CONFIG)
        assert from_checkpoint.engine.runner.plan.quant == f"{method} on bitsandbytes"
        at_load = LLM(_model(quant_models, method)[0], dtype="float32", quantize=method, **CONFIG)
        a, b = (e.generate(PROMPTS, greedy(NEW)) for e in (from_checkpoint, at_load))
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        from_checkpoint.close()
        at_load.close()


@pytest.mark.parametrize(("method", "ratio"), [("int4", 0.3), ("int8", 0.55), ("gptq_g64", 0.3), ("awq_g64", 0.3)])
def test_quantized_weights_take_their_share_of_memory(method: str, ratio: float, quant_models: QuantModels) -> None:
    """int4 with groups of 64 or more (an fp16 scale and offset per group) under 0.3x of bf16, int8 under 0.55x."""
    path, quantize = (str(quant_models(method)), None) if method.endswith("g64") else _model(quant_models, method)
    llm = LLM(path, dtype="bfloat16", quantize=quantize, **CONFIG)
    matmuls = [m.qmatmul for m in llm.engine.runner.model.modules() if getattr(m, "qmatmul", None) is not None]
    assert len(matmuls) == 4 * 2  # qkv, o, gate_up, down in each of the 2 layers
    held, dense = sum(m.nbytes for m in matmuls), sum(m.n * m.k * 2 for m in matmuls)
    assert held < ratio * dense
    assert all(not isinstance(getattr(m, "weight", None), torch.nn.Parameter) or m.weight.numel() == 0
               for m in llm.engine.runner.model.modules() if getattr(m, "qmatmul", None) is not None)  # fmt: skip
    llm.close()


@pytest.mark.parametrize(("model", "method"), [("llama_gqa", "int4"), ("qwen2", "int8"), ("gptq", None), ("awq", None)])
def test_the_decoder_stack_runs_the_int_kernel_bit_for_bit(
    model: str, method: str | None, quant_models: QuantModels
) -> None:
    """CPU bf16: every decoder layer in one compiled call, through the same int kernel as the per-module path; qwen2
    adds qkv biases. Act-order GPTQ (an input gather) and bitsandbytes leave it to the modules."""
    path = str(quant_models(model) if method is None else quant_models.tiny_models(model))
    prompts = PROMPTS + [random_prompt(70, seed=34)]
    stacked = LLM(path, dtype="bfloat16", quantize=method, **CONFIG)
    modules = LLM(path, dtype="bfloat16", quantize=method, cpu_decoder_stack=False, **CONFIG)
    assert stacked.engine.runner.decoder_stack and not modules.engine.runner.decoder_stack
    for got, want in zip(stacked.generate(prompts, greedy(NEW)), modules.generate(prompts, greedy(NEW)), strict=True):
        assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
    for llm in (stacked, modules):
        llm.close()
    for path, method in ((quant_models("gptq_act"), None), (quant_models.tiny_models("llama_gqa"), "bitsandbytes-nf4")):
        aside = LLM(str(path), dtype="bfloat16", quantize=method, **CONFIG)
        assert not aside.engine.runner.decoder_stack
        aside.close()
