"""Quantized models over two tensor-parallel ranks (CPU, gloo) give the tokens and logprobs of one rank; and every
quantization setting that contradicts the checkpoint, or that the device cannot run, stops `serve` with exit code 2
and one line naming the variable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine import LLM
from engine.parallel_config import ParallelConfigError
from engine.quant import cpu_kernel
from engine.quant.config import QuantizationError
from tests.quant.quant_models import QuantModels
from tests.support.serve_process import base_env, run_serve
from tests.support.tiny_models import greedy, random_prompt

PROMPTS = [random_prompt(n, seed) for n, seed in [(5, 41), (30, 42)]]
CONFIG = dict(dtype="float32", max_batch_total_tokens=4096)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["gptq", "awq", "fp8", "int4", "int8"])
def test_two_ranks_give_the_tokens_of_one(method: str, quant_models: QuantModels) -> None:
    """Column-parallel layers split outputs, row-parallel ones inputs on group boundaries (groups of 32 here).
    (bitsandbytes quantizes each rank's slice in blocks of 64 of its own rows: the same blocks as one rank only where
    a rank's inputs are a multiple of 64, which these 32-input slices are not.)"""
    if method in ("gptq", "awq", "fp8"):
        path, extra = str(quant_models(method)), {}
    else:
        path, extra = str(quant_models.tiny_models("llama_gqa")), {"quantize": method, "quant_group_size": 32}
    one = LLM(path, **CONFIG, **extra)
    want = one.generate(PROMPTS, greedy(12))
    one.close()
    with LLM(path, tensor_parallel_size=2, **CONFIG, **extra) as two:
        got = two.generate(PROMPTS, greedy(12))
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_a_degree_that_splits_a_group_is_refused(quant_models: QuantModels, tmp_path: Path) -> None:
    path = quant_models("gptq_g64")  # attention output inputs 64: two ranks get 32 each, half a group
    with pytest.raises(ParallelConfigError, match=r"^tensor-parallel degree 2 splits the gptq groups of 64 inputs"):
        LLM(str(path), tensor_parallel_size=2, **CONFIG)


def test_act_order_over_ranks_is_refused(quant_models: QuantModels) -> None:
    with pytest.raises(ParallelConfigError, match="act-order"):
        LLM(str(quant_models("gptq_act")), tensor_parallel_size=2, **CONFIG)


@pytest.mark.parametrize(
    ("source", "quantize", "message"),
    [
        ("gptq", "awq", "awq contradicts the checkpoint, which is gptq-quantized"),
        ("awq", "int4", "int4 contradicts the checkpoint, which is awq-quantized"),
        ("fp8", "none", "none contradicts the checkpoint, which is fp8-quantized"),
        ("base", "gptq", "gptq needs a GPTQ checkpoint"),
        ("base", "gguf", "gguf needs a .gguf model file"),
        ("base", "fp8", "fp8 needs a GPU with FP8 (compute capability 8.9+: L4, L40S, H100), not the CPU"),
    ],
)
def test_contradictions_name_both_sides(source: str, quantize: str, message: str, quant_models: QuantModels) -> None:
    path = quant_models.tiny_models("llama_gqa") if source == "base" else quant_models(source)
    with pytest.raises(QuantizationError, match=re.escape(message)):
        LLM(str(path), quantize=quantize, **CONFIG)


def test_unsupported_checkpoint_method_is_named(quant_models: QuantModels, tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "eetq"
    shutil.copytree(quant_models.tiny_models("llama_gqa"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "eetq"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="quant_method 'eetq', which is not supported"):
        LLM(str(path), **CONFIG)


@pytest.mark.parametrize(
    ("variable", "source", "value", "message"),
    [
        ("HF_MODEL_QUANTIZE", "gptq", "awq", "awq contradicts the checkpoint, which is gptq-quantized"),
        ("QUANTIZE", "base", "fp8", "needs a GPU with FP8"),
    ],
)
@pytest.mark.integration
def test_serve_exits_2_with_one_line_naming_the_variable(
    variable: str, source: str, value: str, message: str, quant_models: QuantModels, tmp_path: Path
) -> None:
    path = quant_models.tiny_models("llama_gqa") if source == "base" else quant_models(source)
    env = base_env(SM_OPT_ML_DIR=str(tmp_path), HF_MODEL_ID=str(path), LOG_LEVEL="error", DTYPE="float32")
    env[variable] = value
    result = run_serve(env, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {variable}: {value} ") and message in last, last
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_serve_reports_the_quantization_in_info_and_the_log(quant_models: QuantModels, tmp_path: Path) -> None:
    """A GPTQ checkpoint served with nothing set: /info names the method and kernel; the log the bytes."""
    import urllib.request

    from tests.support.serve_process import Serve, free_port

    env = base_env(SM_OPT_ML_DIR=str(tmp_path), HF_MODEL_ID=str(quant_models("gptq")), DTYPE="bfloat16",
                   SAGEMAKER_BIND_TO_PORT=str(free_port()), SERVE_WORKERS="1", CLOUDWATCH_METRICS="false")  # fmt: skip
    server = Serve(env, tmp_path / "serve.log")
    try:
        server.wait_ready()
        with urllib.request.urlopen(server.url("/info"), timeout=10) as response:
            info = json.loads(response.read())
        kernel = cpu_kernel.kernel_name()  # cpu_amx where this CPU has AMX tiles
        assert info["quantize"] == f"gptq int4 g32 on {kernel}"
        assert "MiB in bfloat16 ->" in server.log() and f"(quantization: gptq int4 g32 on {kernel})" in server.log()
        server.proc.terminate()
        assert server.wait_exit(60) == 0
    finally:
        server.close()
