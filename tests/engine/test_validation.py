"""Bad input raises ValueError with a message naming the problem: empty or too-long prompts, token ids
outside the vocabulary, invalid sampling values, and model directories that are missing, lack a
config.json, or hold a malformed one. A rejected request leaves the engine usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import MAX_POSITIONS, TinyModels, greedy, random_prompt


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "empty"),
        ([], "empty"),
        (random_prompt(MAX_POSITIONS, seed=1), "context"),
        (random_prompt(MAX_POSITIONS + 40, seed=2), "context"),
        ([5, 10**6], "vocabulary"),
        ([-1], "vocabulary"),
    ],
    ids=["empty-text", "empty-ids", "context-length", "beyond-context", "id-too-large", "negative-id"],
)
def test_bad_prompts(prompt, match: str, engines: Engines, oracle: Oracle) -> None:
    llm = engines("llama_gqa")
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], greedy(4))
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request(prompt, greedy(4))
    assert not llm.engine.has_unfinished_requests()
    # still serving
    ok = random_prompt(5, seed=3)
    assert llm.generate([ok], greedy(3))[0].token_ids == oracle.greedy("llama_gqa", ok, 3)


def test_a_bad_prompt_in_a_batch_rejects_the_call(engines: Engines) -> None:
    llm = engines("llama_gqa")
    eng = llm.engine
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[5, 6], ""], greedy(4))
    leftover = [s.request_id for s in [*eng.scheduler.running, *eng.scheduler.waiting]]
    for rid in leftover:  # clean up for the tests that share this engine, then judge
        eng.abort_request(rid)
    assert leftover == [], "requests added before the bad prompt were left in the engine"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"top_k": 0}, "top_k"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"top_n_tokens": -1}, "top_n_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_invalid_sampling_params(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_more_params_than_prompts(engines: Engines) -> None:
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        engines("llama_gqa").generate([[5, 6]], [greedy(2), greedy(2)])


def test_request_that_cannot_fit_in_the_kv_cache(engines: Engines) -> None:
    llm = engines("llama_gqa", max_batch_total_tokens=256, max_batch_prefill_tokens=32, block_size=16)
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([random_prompt(200, seed=4)], greedy(100))
    assert not llm.engine.has_unfinished_requests()


def test_duplicate_request_id(engines: Engines) -> None:
    eng = engines("llama_gqa").engine
    eng.add_request([5, 6, 7], greedy(2), request_id="dup")
    try:
        with pytest.raises(ValueError, match="dup"):
            eng.add_request([8, 9], greedy(2), request_id="dup")
    finally:
        eng.abort_request("dup")
    assert not eng.has_unfinished_requests()


def test_chat_without_a_chat_template(tiny_models: TinyModels, tmp_path: Path) -> None:
    path = tmp_path / "no_template"
    shutil.copytree(tiny_models("llama_gqa"), path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    llm = LLM(str(path), dtype="float32", max_batch_total_tokens=256)
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}])


def test_missing_model_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(str(missing), dtype="float32")


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path / "empty_model"), dtype="float32")


@pytest.mark.parametrize(
    "content",
    ['{"model_type": "llama", "hidden_size": ', "not json at all", '{"hidden_size": 64}', '["a", "list"]'],
    ids=["truncated", "not-json", "no-model-type", "not-an-object"],
)
def test_malformed_config_json(content: str, tiny_models: TinyModels, tmp_path: Path) -> None:
    path = tmp_path / "bad_config"
    shutil.copytree(tiny_models("llama_gqa"), path)
    (path / "config.json").write_text(content)
    with pytest.raises(ValueError, match="config"):
        LLM(str(path), dtype="float32")


@pytest.mark.parametrize("content", ["{", "[1, 2]"], ids=["truncated", "not-an-object"])
def test_malformed_generation_config_json(content: str, tiny_models: TinyModels, tmp_path: Path) -> None:
    """The generation config's EOS ids are read at start-up: a bad file is named, not a crash inside the engine."""
    path = tmp_path / "bad_generation_config"
    shutil.copytree(tiny_models("llama_gqa"), path)
    (path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match="generation_config.json"):
        LLM(str(path), dtype="float32")


def test_unsupported_architecture(tiny_models: TinyModels, tmp_path: Path) -> None:
    path = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models("llama_gqa"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FancyNewForCausalLM|gpt2"):
        LLM(str(path), dtype="float32")


@pytest.mark.parametrize(
    "kw",
    [{"dtype": "float64"}, {"block_size": 0}, {"max_num_seqs": 0}, {"max_batch_prefill_tokens": -1}],
    ids=lambda kw: "-".join(kw),
)
def test_invalid_engine_config(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        EngineConfig(**kw)
