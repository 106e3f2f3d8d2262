"""The embedded default model (SmolLM2-135M-Instruct, a Q4_1 GGUF) served with its Q4_1 weights kept native on the
int4 kernel, as it is by default, against the same file dequantized to bfloat16 (QUANTIZE=none): the same answers
within the stated tolerance, the same weights bit for bit (the tied LM head on token_embd's Q8_0 codes too), and
under half the weight memory. Slow: loads it twice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, dequantize

from engine import LLM, SamplingParams
from engine.benchmark import build_prompts
from engine.default_model import default_model_path
from engine.quant import cpu_kernel
from engine.quant.report import weight_bytes

pytestmark = pytest.mark.slow
# mean |logprob| difference over the tokens both pick, pooled over the prompts (a prompt whose answers part after 4
# tokens weighs 4 tokens) and per prompt with 8+ common tokens: float32-exact weights vs bf16-rounded ones
LOGPROB_TOL = 0.06


@pytest.fixture(scope="module")
def pair() -> tuple[LLM, LLM]:
    native, dense = LLM(max_batch_total_tokens=8192), LLM(quantize="none", max_batch_total_tokens=8192)
    yield native, dense
    native.close()
    dense.close()


def test_default_is_served_native(pair: tuple[LLM, LLM]) -> None:
    native, dense = pair
    assert native.engine.runner.plan.quant.startswith("gguf on ")
    assert dense.engine.runner.plan.quant == "none"
    held = [weight_bytes(e.engine.runner.model, torch.bfloat16)[1] for e in pair]
    assert held[0] < 0.5 * held[1]


def test_native_weights_are_the_files_own(pair: tuple[LLM, LLM]) -> None:
    """Layer 3's down projection, dequantized from the kernel's packed layout, equals gguf.dequantize bit for bit."""
    native, _ = pair
    qm = native.engine.runner.model.model.layers[3].mlp.down_proj.qmatmul
    tensor = next(t for t in GGUFReader(default_model_path()).tensors if t.name == "blk.3.ffn_down.weight")
    want = dequantize(tensor.data, tensor.tensor_type).reshape(qm.n, qm.k)
    assert np.array_equal(qm.dequantize().numpy().view(np.uint32), want.view(np.uint32))


def test_the_tied_head_serves_token_embd_q8_0_codes(pair: tuple[LLM, LLM]) -> None:
    """The LM head runs on token_embd's own Q8_0 codes (bit for bit), and the embedding looks its rows up there:
    no 16-bit table kept. QUANTIZE=none keeps both in bfloat16."""
    native, dense = pair
    model = native.engine.runner.model
    head, embedding = model.lm_head, model.model.embed_tokens
    tensor = next(t for t in GGUFReader(default_model_path()).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q8_0" and "output.weight" not in {t.name for t in GGUFReader(
        default_model_path()).tensors}  # fmt: skip
    want = dequantize(tensor.data, tensor.tensor_type).reshape(head.qmatmul.n, head.qmatmul.k)
    assert head.qmatmul.bits == 8 and head.qmatmul.kernel in cpu_kernel.KERNELS
    assert np.array_equal(head.qmatmul.dequantize().numpy().view(np.uint32), want.view(np.uint32))
    assert embedding.weight.numel() == 0
    ids = torch.tensor([0, 1, 1000, head.qmatmul.n - 1])
    assert torch.equal(embedding(ids), torch.from_numpy(want[ids.numpy()]).bfloat16())
    dense_model = dense.engine.runner.model
    assert dense_model.lm_head.qmatmul is None and dense_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(dense_model.model.embed_tokens(ids), embedding(ids))


NEAR_TIE = 0.2  # logprob gap between an engine's top two picks that counts as a tie (the coffee prompt: 0.125)


def test_the_default_model_answers_as_in_bf16(pair: tuple[LLM, LLM]) -> None:
    native, dense = pair
    prompts = build_prompts(native.tokenizer, 8)
    params = SamplingParams(max_new_tokens=32, do_sample=False, top_n_tokens=2)
    got, want = native.generate(prompts, params), dense.generate(prompts, params)
    assert native.tokenizer.decode(got[0].token_ids, skip_special_tokens=True) == "The capital of France is Paris."
    common, diffs = 0, []
    for g, w in zip(got, want):
        n = next((i for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b), len(w.token_ids))
        common += n
        if n == 0:  # different first picks, at a near-tie: each engine ranks the other's pick second, about as likely
            for mine, other in ((g, w), (w, g)):
                runner_up = dict(mine.top_tokens[0])
                assert other.token_ids[0] in runner_up, (mine.top_tokens[0], other.token_ids[0])
                assert mine.logprobs[0] - runner_up[other.token_ids[0]] < NEAR_TIE
            continue
        diff = (torch.tensor(g.logprobs[:n]) - torch.tensor(w.logprobs[:n])).abs()
        assert n < 8 or diff.mean() < LOGPROB_TOL, diff  # a prompt with 8+ common tokens holds on its own too
        diffs.append(diff)
    assert diffs and torch.cat(diffs).mean() < LOGPROB_TOL, diffs
    assert common >= 0.5 * sum(len(w.token_ids) for w in want)  # greedy parts only at near-ties
