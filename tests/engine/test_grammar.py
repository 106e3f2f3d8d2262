"""Constrained decoding through the engine, on a tiny random model whose free output is gibberish: under a JSON schema
the output parses and validates with `jsonschema` (greedy and sampled, next to free requests that stay token-identical
to a run without grammars); under a regex it fully matches; a budget cut gives "length" and a prefix the grammar still
accepts; a complete grammar forces EOS; preemption and recompute mid-grammar change nothing; a broken grammar fails its
request alone.
"""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch

from engine import LLM, SamplingParams
from engine.grammar.spec import GrammarError, GrammarSpec
from tests.support.oracle import Engines, run_to_completion
from tests.support.tiny_models import greedy, random_prompt
from tests.support.tiny_tokenizer import EOS_ID

MODEL = "llama_gqa"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)!", r"[a-z]{2,6}@[a-z]{3}\.(com|org)"]


def _schema_params(seed: int | None, **kw) -> SamplingParams:
    sampled = {"do_sample": True, "seed": seed, "temperature": 1.3} if seed is not None else {}
    return SamplingParams(max_new_tokens=220, grammar=GrammarSpec.json_schema(SCHEMA), **sampled, **kw)


def _valid(text: str, schema: dict = SCHEMA) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def _accepted_prefix(tokenizer, spec: GrammarSpec, ids: list[int]) -> bool:
    """llguidance itself (a fresh matcher) accepts every one of `ids` under `spec`."""
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=EOS_ID)
    return llguidance.LLMatcher(lltok, spec.llguidance_grammar(), log_level=0).consume_tokens(ids)


def test_schema_outputs_validate_in_a_mixed_batch(engines: Engines) -> None:
    llm = engines(MODEL)
    free_prompts = [random_prompt(n, seed=n) for n in (5, 17, 30)]
    alone = [o.token_ids for o in llm.generate(free_prompts, greedy(24))]
    prompts, params = [], []
    for k in range(8):
        prompts.append(random_prompt(6 + k, seed=500 + k))
        params.append(_schema_params(None if k < 3 else k))  # greedy and sampled
        if k < len(free_prompts):
            prompts.append(free_prompts[k])
            params.append(greedy(24))
    outs = llm.generate(prompts, params)
    constrained = [o for o, p in zip(outs, params) if p.grammar is not None]
    for out in constrained:
        assert out.finish_reason == "eos_token", out.text
        assert out.token_ids[-1] == EOS_ID
        _valid(out.text)
    assert len({o.text for o in constrained}) > 3  # sampling explores: not one fixed answer
    assert [o.token_ids for o, p in zip(outs, params) if p.grammar is None] == alone  # free rows untouched


@pytest.mark.parametrize("pattern", REGEXES)
@pytest.mark.parametrize("seed", [None, 3])
def test_regex_output_fully_matches(engines: Engines, pattern: str, seed: int | None) -> None:
    sampled = {"do_sample": True, "seed": seed} if seed is not None else {}
    params = SamplingParams(max_new_tokens=40, grammar=GrammarSpec.regex(pattern), **sampled)
    outs = engines(MODEL).generate([random_prompt(9, seed=k) for k in range(3)], params)
    for out in outs:
        assert out.finish_reason == "eos_token"
        assert re.fullmatch(pattern, out.text), out.text


def test_a_budget_cut_is_length_and_a_valid_prefix(engines: Engines, tokenizer) -> None:
    spec = GrammarSpec.json_schema(SCHEMA)
    outs = engines(MODEL).generate(
        [random_prompt(7, seed=k) for k in range(3)], SamplingParams(max_new_tokens=9, grammar=spec)
    )
    for out in outs:
        assert out.finish_reason == "length" and len(out.token_ids) == 9
        assert out.text.startswith('{"name":"')
        assert _accepted_prefix(tokenizer, spec, out.token_ids)


def test_a_complete_grammar_forces_eos_even_when_eos_is_ignored(engines: Engines) -> None:
    for ignore_eos in (False, True):
        params = SamplingParams(max_new_tokens=30, grammar=GrammarSpec.regex("(ab|cd)"), ignore_eos=ignore_eos)
        (out,) = engines(MODEL).generate([random_prompt(5, seed=1)], params)
        assert out.text in ("ab", "cd") and out.token_ids[-1] == EOS_ID and out.finish_reason == "eos_token"


def test_preemption_and_recompute_mid_grammar_change_nothing(engines: Engines) -> None:
    """A KV cache too small for the batch: requests are preempted mid-output and recomputed; every output is the
    one an uncontended engine gives, token for token, and validates."""
    prompts = [random_prompt(20 + k, seed=900 + k) for k in range(6)]
    params = [_schema_params(None if k % 2 else k) for k in range(6)]
    roomy = engines(MODEL).generate(prompts, params)
    tight = engines(MODEL, max_batch_total_tokens=320, block_size=16)
    before = tight.engine.scheduler.num_preemptions
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > before
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    for out in outs:
        assert out.finish_reason == "eos_token"
        _valid(out.text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec.json_schema({"type": "object", "not": {"type": "string"}}), "Unimplemented keys"),
        (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "does not exist"),
        (GrammarSpec.regex("(?<=a)b"), "look-around"),
        (GrammarSpec.regex("(a"), "unclosed group"),
        (GrammarSpec.regex("x" * 70000), "at most 65536"),
    ],
)
def test_a_grammar_that_cannot_compile_is_refused_at_add_request(engines: Engines, spec: GrammarSpec, message) -> None:
    engine = engines(MODEL).engine
    with pytest.raises(GrammarError, match=re.escape(message)):
        engine.add_request([5, 6, 7], SamplingParams(grammar=spec))
    assert not engine.has_unfinished_requests()


def test_compiled_grammars_are_cached_by_spec(engines: Engines) -> None:
    engine = engines(MODEL).engine
    spec = GrammarSpec.regex("[xyz]{4}")
    a, b = engine.grammars.state(spec), engine.grammars.state(GrammarSpec.regex("[xyz]{4}"))
    assert engine.grammars._cache[spec] is not None and a.matcher is not b.matcher  # one compile, two matchers
    assert len([k for k in engine.grammars._cache if k == spec]) == 1


def test_a_broken_grammar_fails_its_request_alone(engines: Engines) -> None:
    llm = engines(MODEL)
    engine = llm.engine
    free = engine.add_request(random_prompt(8, seed=2), greedy(12))
    other = engine.add_request(random_prompt(9, seed=3), _schema_params(None))
    victim = engine.add_request(random_prompt(10, seed=4), _schema_params(None))
    engine.step()
    engine._requests[victim].grammar.matcher.consume_token(EOS_ID)  # its matcher can never go on
    engine._requests[victim].grammar.matcher.consume_token(EOS_ID)
    done = {o.request_id: o for o in run_to_completion(llm) if o.finished}
    assert done[victim].finish_reason == "error" and "grammar" in done[victim].error
    assert done[free].finish_reason == "length"
    _valid(done[other].text)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.integration
def test_two_tensor_parallel_ranks_give_the_constrained_tokens_of_one(engines: Engines, tiny_models) -> None:
    """Masks are applied on rank 0, where sampling is: two ranks (gloo) give one rank's constrained tokens. The model
    has one vocabulary row more than its tokenizer: that id is never allowed."""
    from engine import LLM
    from tests.engine.test_tensor_parallel import CONFIG, model_path

    name = "tp_kv1_tied"
    prompts = [random_prompt(6 + k, seed=40 + k) for k in range(3)]
    params = [
        _schema_params(None),
        _schema_params(7),
        SamplingParams(max_new_tokens=30, grammar=GrammarSpec.regex(REGEXES[2])),
    ]
    one = LLM(model_path(tiny_models, name), **CONFIG)
    reference = one.generate(prompts, params)
    with LLM(model_path(tiny_models, name), tensor_parallel_size=2, **CONFIG) as two:
        outs = two.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    _valid(outs[0].text)
    _valid(outs[1].text)
    assert re.fullmatch(REGEXES[2], outs[2].text)


def _mixed_batch_on(llm: LLM) -> None:
    """Greedy and sampled schema rows and a regex row next to a free one: every constrained output is valid."""
    params = [_schema_params(None), _schema_params(4), SamplingParams(max_new_tokens=40, grammar=GrammarSpec.regex(
        REGEXES[0])), greedy(12)]  # fmt: skip
    outs = llm.generate([random_prompt(7 + k, seed=900 + k) for k in range(4)], params)
    for out in outs[:2]:
        assert out.finish_reason == "eos_token", out.text
        _valid(out.text)
    assert re.fullmatch(REGEXES[0], outs[2].text), outs[2].text


@pytest.mark.slow
def test_constrained_rows_on_the_triton_attention_backend(engines: Engines) -> None:
    """The GPU attention backend (Triton's interpreter on CPU tensors): the masks follow the logits whatever ran."""
    _mixed_batch_on(engines(MODEL, attention_backend="triton", block_size=16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constrained_rows_on_cuda(engines: Engines) -> None:
    """On the GPU the bitmask goes to the device (pinned, non-blocking) and is applied by the batched sampler."""
    _mixed_batch_on(engines(MODEL, device="cuda"))
