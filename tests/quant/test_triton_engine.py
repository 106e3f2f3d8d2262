"""The int formats through the engine as a GPU plans them (the Triton dequantize-GEMM), here in Triton's interpreter
on the CPU: tests/quant/test_gpu.py's check, rehearsed where no GPU is. In float16: the interpreter's `tl.dot` of
bfloat16 inputs returns garbage (Triton 3.9), so bfloat16 is held by the sm_80 / sm_90 compile and the GPU run. And
the GPU quantization benchmark's smoke run.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine import LLM, model_runner
from tests.quant.quant_models import QuantModels
from tests.quant.test_engine import CONFIG, NEW, PROMPTS, _chosen_log_probs, _model, _reference
from tests.quant.test_gpu import TOL
from tests.support.tiny_models import greedy

pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU)")
@pytest.mark.parametrize("method", ["gptq", "gptq_act", "awq", "int4", "int8"])
def test_int_formats_on_the_triton_kernel_follow_the_dequantized_weights(
    method: str, quant_models: QuantModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(model_runner, "resolve_quant_kernel", lambda *a: "triton")
    path, quantize = _model(quant_models, method)
    llm = LLM(path, dtype="float16", quantize=quantize, **CONFIG)
    try:
        assert llm.engine.runner.plan.quant.endswith("on triton")
        ref = _reference(quant_models, method, torch.float16)
        for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW))):
            chosen = _chosen_log_probs(ref, prompt, out.token_ids)
            assert (torch.tensor(out.logprobs) - chosen).abs().mean() < TOL
    finally:
        llm.close()


def test_the_gpu_quantization_benchmark_runs(tmp_path) -> None:
    """The script tests/gpu/run.sh runs once on a lent GPU, smoke-tested on the tiny shape (CPU kernel here)."""
    from engine import quant_gpu_benchmark

    out = tmp_path / "report.json"
    report = quant_gpu_benchmark.main(["--device", "cpu", "--shape", "tiny", "--output", str(out)])
    assert [r["method"] for r in report["results"]] == ["bf16", "gptq", "awq"]
    assert all(r["batch1_step_ms"] > 0 and r["batch4_tokens_per_s"] > 0 for r in report["results"])
    assert json.loads(out.read_text())["results"] == report["results"]
