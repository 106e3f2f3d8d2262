"""Every rope scaling type transformers defines (linear, dynamic NTK, yarn, llama3, longrope) against transformers
`generate` on contexts past the original length (32): greedy tokens identical and logprobs within 1e-4 of the scores
`generate` computed, through chunked prefill and preemption. `generate`'s own logits are the reference (not one
forward over the whole text), because dynamic and longrope tables depend on the length each forward pass sees.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.family_models import ROPE_SCALINGS
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import greedy, random_prompt
from tests.support.tiny_tokenizer import EOS_ID, PAD_ID

ORIGINAL = 32
PROMPTS = [random_prompt(n, seed=300 + n) for n in (5, 17, 31, 24)]  # shorter than the original context
MAX_NEW = 30  # past it
TOL = 1e-4


def _generate(oracle: Oracle, name: str, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers greedy tokens and the log-softmax of the logits that chose each one [steps, V]."""
    out = oracle.model(name).generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=MAX_NEW, eos_token_id=EOS_ID, pad_token_id=PAD_ID, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_generate_past_the_original_context(kind: str, engines: Engines, oracle: Oracle) -> None:
    name = f"rope_{kind}"
    llm = engines(name, max_batch_total_tokens=96, max_batch_prefill_tokens=16, block_size=8)
    before = llm.engine.scheduler.num_preemptions
    outs = llm.generate(PROMPTS, greedy(MAX_NEW))
    assert llm.engine.scheduler.num_preemptions > before, "the small KV pool never preempted"
    assert max(len(p) + len(o.token_ids) for p, o in zip(PROMPTS, outs)) > 2 * ORIGINAL - 8
    for prompt, out in zip(PROMPTS, outs):
        tokens, ref = _generate(oracle, name, prompt)
        assert out.token_ids == tokens
        chosen = ref.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)


def test_context_length_counts_the_scaling(engines: Engines) -> None:
    """linear / dynamic stretch max_position_embeddings by their factor; yarn, llama3 and longrope configs already
    hold the extended length there."""
    lens = {kind: engines(f"rope_{kind}").engine.max_model_len for kind in ROPE_SCALINGS}
    assert lens == {"linear": 64, "dynamic": 64, "yarn": 128, "llama3": 128, "longrope": 128}
