"""Tensor parallelism through the transformers fallback on CPU (gloo, float32): architectures we have no native
implementation of, sharded by their declared `base_model_tp_plan`, give at two ranks the greedy tokens of one rank
and of transformers `generate` (logprobs within 1e-4), rank 0 holding less than the whole model; a plan the fallback
cannot apply is refused at start-up, in one line, before any process starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
from transformers import AutoConfig

from engine import LLM
from engine.models.transformers_tp import tp_plan_problem
from engine.parallel_config import ParallelConfigError
from tests.support.fallback_models import FALLBACK_SPECS
from tests.support.family_models import FamilySpec
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import TinyModels, greedy, random_prompt

CONFIG = dict(dtype="float32", max_batch_total_tokens=4096, max_batch_prefill_tokens=48)  # chunked prefill too
PROMPTS = [random_prompt(n, seed) for n, seed in [(3, 1), (40, 3), (90, 5)]]
NEW_TOKENS = 16
# Cohere with one key/value head: both ranks hold that head (k_proj/v_proj replicated) and its per-head k norm
COHERE_KV1 = FamilySpec("cohere", dict(FALLBACK_SPECS["cohere"].config, num_key_value_heads=1), seed=45)


def _weights(llm: LLM) -> int:
    return sum(p.numel() for p in llm.engine.runner.model.parameters())


@pytest.mark.integration
@pytest.mark.parametrize("name", ["olmo", "granite", "cohere_kv1"])
def test_two_ranks_of_the_fallback_give_the_tokens_of_one_rank_and_transformers(
    name: str, tiny_models: TinyModels, engines: Engines, oracle: Oracle
) -> None:
    path = tiny_models(name, COHERE_KV1 if name == "cohere_kv1" else None)
    one = engines(name, **CONFIG)
    reference = one.generate(PROMPTS, greedy(NEW_TOKENS))
    with LLM(str(path), tensor_parallel_size=2, **CONFIG) as two:
        assert two.engine.runner.plan.model == "transformers"
        layers = two.engine.runner.model.attention_layers()
        # 4 query heads and 2 key/value heads (cohere_kv1: 1, replicated) -> 2 and 1 on each rank
        assert {(a.num_heads, a.num_kv_heads) for a in layers} == {(2, 1)}
        assert _weights(two) < _weights(one)  # rank 0 holds its shard of every layer (embeddings replicated)
        outs = two.generate(PROMPTS, greedy(NEW_TOKENS))
    for prompt, out, ref in zip(PROMPTS, outs, reference):
        assert out.token_ids == ref.token_ids == oracle.greedy(name, prompt, NEW_TOKENS)
        assert out.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


@pytest.mark.parametrize(
    ("model_type", "why"),
    [
        ("olmo2", "'colwise_gather_output'"),  # q/k/v gathered for a norm over all heads
        ("mixtral", "'moe_tp_experts'"),
        ("phi3", "'rowwise_split_input'"),  # and its packed gate_up / qkv projections
    ],
)
def test_plans_the_fallback_does_not_shard(model_type: str, why: str) -> None:
    assert why in tp_plan_problem(AutoConfig.for_model(model_type))
    assert tp_plan_problem(AutoConfig.for_model("olmo")) is None
    assert "declares no tensor-parallel plan" in tp_plan_problem(AutoConfig.for_model("olmo", base_model_tp_plan={}))


def _olmo_with_plan(tiny_models: TinyModels, tmp_path: Path, plan: dict | None) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny_models("olmo"), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "base_model_tp_plan": plan}))
    return path


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"layers.*.mlp.up_proj": "local_colwise", "layers.*.mlp.down_proj": "rowwise"}, "asks for 'local_colwise'"),
        ({}, "declares no tensor-parallel plan"),
    ],
)
def test_an_unsupported_plan_is_refused_in_one_line_before_any_process(
    plan: dict, message: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    path = _olmo_with_plan(tiny_models, tmp_path, plan)
    children = set(psutil.Process().children())
    with pytest.raises(ParallelConfigError) as e:
        LLM(str(path), tensor_parallel_size=2, **CONFIG)
    text = str(e.value)
    assert "\n" not in text and "transformers fallback, which cannot shard it" in text and message in text
    assert set(psutil.Process().children()) == children
