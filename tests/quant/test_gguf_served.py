"""A GGUF file served with its quantization (Q4_0 / Q4_1 / Q8_0 layers; a head tied to a Q8_0 or Q4_1 token_embd, or
an untied Q4_0 one) follows transformers loading the same file, and two tensor-parallel ranks give the tokens of one
(tests/quant/gguf_model.py writes the model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from transformers import AutoModelForCausalLM, PreTrainedModel

from engine import LLM
from engine.quant import cpu_kernel
from tests.quant.gguf_model import LAYER_TYPES, VOCAB, write_tiny_gguf
from tests.support.tiny_models import greedy, random_prompt

PROMPTS = [random_prompt(n, seed, vocab_size=VOCAB) for n, seed in [(5, 51), (23, 52), (40, 53)]]
NEW = 10
CONFIG = dict(max_batch_total_tokens=4096)
Q = GGMLQuantizationType
HEADS = {"tied_q8_0": (None, Q.Q8_0), "tied_q4_1": (None, Q.Q4_1), "untied_q4_0": (Q.Q4_0, Q.Q8_0)}  # (head, embd)
BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gguf")
    return {name: write_tiny_gguf(root / f"{name}.gguf", head, embd) for name, (head, embd) in HEADS.items()}


def _reference(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def _chosen(ref: PreTrainedModel, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated)]: transformers' log-probability of each generated token, teacher-forced."""
    ids = torch.tensor([prompt + generated])
    logits = ref(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1)


@pytest.mark.slow
@pytest.mark.parametrize("head", list(HEADS))
def test_served_gguf_follows_transformers(head: str, gguf_files: dict[str, Path]) -> None:
    """float32 (the twin: exact dequantized weights): transformers' greedy tokens and log-probabilities. bfloat16 on
    the CPU kernel (AMX tiles from 3 rows where present): its own tokens' log-probabilities within 0.08 (mean) of
    transformers' float32, with every matrix held as codes of its GGUF type."""
    path = gguf_files[head]
    ref = _reference(path)
    with LLM(str(path), dtype="float32", **CONFIG) as llm:
        assert llm.engine.runner.plan.quant == "gguf on twin"
        for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW))):
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)[0, len(prompt) :]
            assert out.token_ids == want.tolist()
            chosen = _chosen(ref, prompt, out.token_ids)
            torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=1e-4, rtol=0)
    with LLM(str(path), dtype="bfloat16", **CONFIG) as llm:
        assert llm.engine.runner.plan.quant == f"gguf on {cpu_kernel.kernel_name()}"
        model = llm.engine.runner.model
        for layer, (attn, mlp) in zip(model.model.layers, LAYER_TYPES):
            assert layer.self_attn.qkv_proj.qmatmul.bits == BITS[attn]
            assert layer.mlp.down_proj.qmatmul.bits == BITS[mlp]
        head_type, embd_type = HEADS[head]
        assert model.lm_head.qmatmul.bits == BITS[head_type or embd_type]
        tied, embedding = head_type is None, model.model.embed_tokens
        # tied: rows looked up in the head's codes, no 16-bit table; untied: token_embd dequantized to a table
        assert (embedding.codes is not None) == tied and (embedding.weight.numel() == 0) == tied
        before = cpu_kernel.amx_calls()
        outs = llm.generate(PROMPTS, greedy(NEW))
        # the plan's cpu_amx reaches the kernel: prefill rows (3+) of the int4 layers ran on tiles
        assert (cpu_kernel.amx_calls() > before) == cpu_kernel.amx_available()
        for prompt, out in zip(PROMPTS, outs):
            assert (torch.tensor(out.logprobs) - _chosen(ref, prompt, out.token_ids)).abs().mean() < 0.08


@pytest.mark.integration
@pytest.mark.parametrize("head", list(HEADS))
def test_gguf_two_ranks_give_the_tokens_of_one(head: str, gguf_files: dict[str, Path]) -> None:
    """Each rank holds its slice of the codes (columns: outputs; rows: inputs on 32-input blocks; the head and the
    tied embedding: vocabulary rows) and gives one rank's tokens and log-probabilities."""
    path = str(gguf_files[head])
    with LLM(path, dtype="float32", **CONFIG) as one:
        want = one.generate(PROMPTS, greedy(NEW))
    with LLM(path, dtype="float32", tensor_parallel_size=2, **CONFIG) as two:
        assert two.engine.runner.plan.quant == "gguf on twin"
        got = two.generate(PROMPTS, greedy(NEW))
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
