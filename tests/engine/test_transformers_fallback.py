"""The transformers fallback (engine/models/transformers_fallback.py) against transformers itself: architectures we
have no native implementation of give `generate`'s greedy tokens, and logprobs within 1e-4, through continuous
batching, chunked prefill, preemption and prefix caching; native architectures forced through it give the native
path's tokens; a model it cannot serve fails at start-up with one line naming the architecture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import LLM
from engine.models.transformers_fallback import unsupported_reason
from tests.support.fallback_models import FALLBACK_SPECS
from tests.support.family_models import LLAMA_LIKE, FamilySpec
from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import TinyModels, greedy, random_prompt

from .test_greedy import _check_staggered

TOL = 1e-4
# 16 blocks of 16 tokens for 8 requests of up to 144 tokens: preempted and recomputed; prompts prefilled 32 at a time
TIGHT = dict(max_batch_total_tokens=256, max_batch_prefill_tokens=32, block_size=16)
FORCED = dict(model_implementation="transformers")
PROMPTS = [random_prompt(n, seed) for n, seed in [(3, 1), (40, 3), (90, 5), (17, 7)]]  # past gemma2's window of 16


def _chosen_log_probs(oracle: Oracle, name: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ref = oracle.log_probs(name, prompt, tokens)
    return ref.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("name", list(FALLBACK_SPECS))
def test_fallback_matches_transformers_with_chunks_and_preemption(name: str, engines: Engines, oracle: Oracle) -> None:
    llm = engines(name, **TIGHT)
    runner = llm.engine.runner
    assert runner.plan.model == "transformers" and "model=transformers_fallback" in runner.plan.describe()
    before = llm.engine.scheduler.num_preemptions
    outs = _check_staggered(llm, oracle, name)
    assert llm.engine.scheduler.num_preemptions > before, "the small KV pool never preempted"
    for out in outs:
        chosen = _chosen_log_probs(oracle, name, out.prompt_token_ids, out.token_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "gemma2"])
def test_a_native_architecture_forced_through_the_fallback_gives_the_native_tokens(name: str, engines: Engines) -> None:
    """Gemma 2's sliding window and attention soft-capping reach our Attention from transformers' call arguments."""
    native, forced = engines(name, **TIGHT), engines(name, **TIGHT, **FORCED)
    assert native.engine.runner.plan.model == "native" and forced.engine.runner.plan.model == "transformers"
    if name == "gemma2":
        layers = forced.engine.runner.model.attention_layers()
        assert {layer.sliding_window for layer in layers} == {16, None}
        assert {layer.logit_softcap for layer in layers} == {5.0}
    reference = native.generate(PROMPTS, greedy(24))
    for out, ref in zip(forced.generate(PROMPTS, greedy(24)), reference):
        assert out.token_ids == ref.token_ids
        assert out.logprobs == pytest.approx(ref.logprobs, abs=TOL)


def test_fallback_reuses_cached_prefixes(tiny_models: TinyModels, oracle: Oracle) -> None:
    llm = LLM(str(tiny_models("olmo")), dtype="float32", block_size=8, max_batch_total_tokens=2048)
    prefix = random_prompt(37, seed=5)  # 4 full blocks of 8
    prompts = [prefix + random_prompt(n, seed=10 + n) for n in (3, 12, 1)]
    first = llm.generate(prompts[:1], greedy(12))
    rest = llm.generate(prompts[1:], greedy(12))
    assert llm.engine.block_manager.hit_tokens == 2 * 4 * 8
    for prompt, out in zip(prompts, first + rest):
        assert out.token_ids == oracle.greedy("olmo", prompt, 12)


def test_fallback_in_bf16_is_as_close_to_float32_as_transformers_bf16(
    tiny_models: TinyModels, engines: Engines, oracle: Oracle
) -> None:
    """bf16 on the CPU backend the plan picks (the paired cache layout, the compiled K/V write)."""
    llm = engines("cohere", dtype="bfloat16", max_batch_total_tokens=4096)
    described = llm.engine.runner.plan.describe()  # transformers' linears and norms run: no CPU fast path is claimed
    assert "matmul=torch" in described and "fused_ops=off" in described and "decoder_stack=off" in described
    hf16 = AutoModelForCausalLM.from_pretrained(tiny_models("cohere"), dtype=torch.bfloat16).eval()
    ours = theirs = 0.0
    for out in llm.generate(PROMPTS, greedy(12)):
        prompt, tokens = out.prompt_token_ids, torch.tensor(out.token_ids)
        ref = _chosen_log_probs(oracle, "cohere", prompt, out.token_ids)
        with torch.no_grad():
            logits = hf16(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        hf = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        ours = max(ours, (torch.tensor(out.logprobs) - ref).abs().max().item())
        theirs = max(theirs, (hf - ref).abs().max().item())
    assert ours <= max(2 * theirs, 0.05), (ours, theirs)


# ---- what it refuses, at start-up, in one line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "config", "why"),
    [
        ("lfm2", dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]), "conv layers"),
        ("mamba", {}, "does not route its attention"),
        ("t5", {}, "encoder-decoder"),
    ],
)
def test_configs_the_fallback_cannot_serve(model_type: str, config: dict, why: str) -> None:
    assert why in unsupported_reason(AutoConfig.for_model(model_type, **config))
    assert unsupported_reason(AutoConfig.for_model("olmo")) is None


def _with_config(tiny_models: TinyModels, tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny_models("llama_gqa"), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))
    return path


def _one_line_error(path: Path, **config: object) -> str:
    with pytest.raises(ValueError) as info:
        LLM(str(path), dtype="float32", max_batch_total_tokens=1024, **config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_architecture_neither_path_serves_names_itself(tiny_models: TinyModels, tmp_path: Path) -> None:
    path = _with_config(tiny_models, tmp_path, architectures=["MambaForCausalLM"], model_type="mamba")
    message = _one_line_error(path)
    assert "MambaForCausalLM" in message and "no native implementation" in message
    assert "does not route its attention" in message


def test_a_checkpoint_transformers_cannot_fill_is_refused(tiny_models: TinyModels, tmp_path: Path) -> None:
    """Llama's tensors under an OLMo config: transformers would leave OLMo's own tensors random."""
    path = _with_config(tiny_models, tmp_path, architectures=["OlmoForCausalLM"], model_type="olmo")
    assert "transformers fallback could not load OlmoForCausalLM" in _one_line_error(path)


def test_attention_options_the_paged_path_lacks_are_refused(tiny_models: TinyModels) -> None:
    """gpt-oss adds learned attention sinks (`s_aux`) to the softmax: found by the start-up probe."""
    spec = FamilySpec(
        "gpt_oss", dict(LLAMA_LIKE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16), seed=44
    )
    message = _one_line_error(tiny_models("gpt_oss", spec))
    assert "cannot serve GptOssForCausalLM" in message and "s_aux" in message


@pytest.mark.slow
def test_triton_prefill_chunks_that_sample_nothing_compute_no_logits(engines: Engines, oracle: Oracle) -> None:
    """A prompt's middle chunk samples no row: the head must see no row (not every row, transformers' 0)."""
    llm = engines("olmo", attention_backend="triton", **TIGHT)
    rows: list[int] = []
    hook = llm.engine.runner.model.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    try:
        prompt = random_prompt(90, seed=3)  # chunks of 32: the first two sample nothing
        (out,) = llm.generate([prompt], greedy(4))
    finally:
        hook.remove()
    assert out.token_ids == oracle.greedy("olmo", prompt, 4)
    assert rows[:2] == [0, 0] and max(rows) == 1, rows


def test_a_quantized_checkpoint_is_refused_naming_the_fallback(tiny_models: TinyModels, tmp_path: Path) -> None:
    path = tmp_path / "model"
    shutil.copytree(tiny_models("olmo"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (path / "config.json").write_text(json.dumps(cfg))
    assert "a gptq checkpoint is not supported through the transformers fallback" in _one_line_error(path)


def test_what_the_fallback_does_not_do(tiny_models: TinyModels) -> None:
    """Tensor parallelism (by the model's declared plan) and its refusals: test_transformers_fallback_tp.py."""
    path = tiny_models("olmo")
    assert "not supported through the transformers fallback" in _one_line_error(path, quantize="int8")
    assert "'OlmoForCausalLM'" in _one_line_error(path, model_implementation="native")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(FALLBACK_SPECS))
def test_fallback_on_cuda_matches_transformers(name: str, engines: Engines, oracle: Oracle) -> None:
    """The default GPU plan (Triton attention; no CUDA graphs for the fallback)."""
    llm = engines(name, device="cuda", **TIGHT)
    assert not llm.engine.runner.plan.cuda_graphs
    _check_staggered(llm, oracle, name)


def test_the_http_api_serves_the_fallback_and_info_says_so(engines: Engines, tmp_path: Path) -> None:
    """/info reports the implementation; /generate through the one engine loop gives LLM.generate's tokens."""
    from serve.app import create_app
    from serve.inprocess_client import InProcessEngineClient
    from serve.server_config import ServerConfig
    from serve.tokenizer_export import export_tokenizer

    llm = engines("olmo")
    prompt = "hello world"
    expected = llm.generate([prompt], greedy(8))[0]
    client = InProcessEngineClient(llm.engine, max_concurrent_requests=4, model_id="tiny-olmo").start()
    try:
        config = ServerConfig.from_model_info(client.model_info(), max_input_tokens=64, max_total_tokens=96)
        app = create_app(client, config, export_tokenizer(llm.engine.tokenizer, str(tmp_path / "tokenizer")))
        api = app.test_client()
        assert api.get("/info").json["model_implementation"] == "transformers"
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True, "decoder_input_details": False}}
        answer = api.post("/generate", json=body).json
        assert [t["id"] for t in answer["details"]["tokens"]] == expected.token_ids
        assert answer["generated_text"] == expected.text
    finally:
        client.stop()
