"""The FP8 matmul (engine/quant/fp8.py: scaled_mm) on the CPU's `torch._scaled_mm`, behind a stand-in that first
applies the checks CUDA makes (aten/src/ATen/native/cuda/Blas.cpp: _scaled_mm_out_cuda and the row-wise recipe;
the strictest of the sm89 CUTLASS and sm90 cuBLAS paths): odd K / N, a token at a time, float16 / float32 models
and biases all reach it in the form the GPU takes, and the result equals the exact emulation and stays near the twin.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, model_runner
from engine.quant import fp8
from engine.quant.matmul import Fp8Matmul
from tests.quant.quant_models import QuantModels
from tests.quant.test_engine import CONFIG, NEW, PROMPTS, _chosen_log_probs, _reference
from tests.quant.test_gpu import FP8_TOL
from tests.support.tiny_models import greedy

_REAL = torch._scaled_mm


def _cpu_rowwise() -> bool:
    """torch 2.13's CPU `_scaled_mm` takes row-wise scales; earlier CPU builds (the GPU image's 2.11) are per-tensor."""
    a = torch.ones(16, 16).to(fp8.FP8)
    try:
        _REAL(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _cpu_rowwise(), reason="this torch's CPU _scaled_mm has no row-wise scaling")


def cuda_scaled_mm(mat1, mat2, *, scale_a, scale_b, bias=None, out_dtype=None, **kw):
    """torch._scaled_mm after CUDA's argument checks (row-wise scaling); raises AssertionError where CUDA raises."""
    assert mat1.dim() == 2 and mat2.dim() == 2 and mat1.shape[1] == mat2.shape[0]
    assert mat1.dtype == mat2.dtype == torch.float8_e4m3fn
    assert mat1.shape[1] % 16 == 0, f"mat1 K {mat1.shape[1]} not divisible by 16"
    assert mat2.shape[0] % 16 == 0 and mat2.shape[1] % 16 == 0, f"mat2 {tuple(mat2.shape)} not divisible by 16"
    assert mat1.stride(1) == 1 and mat2.stride(0) == 1, "mat1 row-major and mat2 column-major"
    m, n = mat1.shape[0], mat2.shape[1]
    for scale, rows, name in ((scale_a, m, "scale_a"), (scale_b.t(), n, "scale_b.t()")):
        assert scale.dtype == torch.float32 and scale.dim() == 2, name  # is_rowwise_scaling
        assert tuple(scale.shape) == (rows, 1) and scale.is_contiguous(), (name, tuple(scale.shape))
    assert out_dtype == torch.bfloat16, f"row-wise on sm89 writes bfloat16 only, got {out_dtype}"
    if bias is not None:
        assert bias.numel() == n and bias.dtype == torch.bfloat16, (bias.numel(), bias.dtype)
    devices = {t.device for t in (mat1, mat2, scale_a, scale_b) + (() if bias is None else (bias,))}
    assert len(devices) == 1, devices
    return _REAL(mat1, mat2, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, **kw)


@pytest.fixture
def cuda_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "_scaled_mm", cuda_scaled_mm)


def _emulated(x: torch.Tensor, w: fp8.Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """What row-wise FP8 computes: x rounded to e4m3 per row, times the FP8 weight, in float32."""
    xs = (x.float().abs().amax(1, keepdim=True) / fp8.FP8_MAX).clamp_min(1e-12)
    xq = (x.float() / xs).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8).float() * xs
    return F.linear(xq, w.dequantize(), None if bias is None else bias.float())


@pytest.mark.parametrize("n,k", [(48, 64), (40, 72), (33, 20)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_mm_meets_cudas_checks_and_matches_the_emulation(n: int, k: int, dtype, cuda_checks) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = fp8.quantize(torch.randn(n, k, generator=g))
    layer = Fp8Matmul(w, "scaled_mm", torch.device("cpu"))
    assert layer.q.shape[0] % 16 == 0 and layer.q.shape[1] % 16 == 0 and layer.q.is_contiguous()
    torch.testing.assert_close(layer.dequantize(), w.dequantize(), rtol=0, atol=0)  # the padding is not read back
    for rows in (1, 5, 17):
        for bias in (None, torch.randn(n, generator=g).to(dtype)):
            x = torch.randn(rows, k, generator=g).to(dtype)
            got = layer(x, bias)
            assert got.dtype == dtype and got.shape == (rows, n) and got.is_contiguous()
            want = _emulated(x, w, bias)
            torch.testing.assert_close(got.float(), want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)
            twin = layer.twin(x.float(), None if bias is None else bias.float())  # FP8 activations: a looser match
            assert (got.float() - twin).abs().max() < 0.1 * twin.abs().max()


def test_scaled_mm_keeps_leading_dims_and_empty_steps(cuda_checks) -> None:
    layer = Fp8Matmul(fp8.quantize(torch.randn(32, 48)), "scaled_mm", torch.device("cpu"))
    assert layer(torch.randn(2, 3, 48, dtype=torch.bfloat16), None).shape == (2, 3, 32)
    assert layer(torch.randn(0, 48, dtype=torch.bfloat16), None).shape == (0, 32)


def test_the_stand_in_refuses_what_cuda_refuses(cuda_checks) -> None:
    """The checks bite: the former call (out in x's dtype, unpadded K) is refused as CUDA refuses it."""
    w = fp8.quantize(torch.randn(40, 72))
    xq = torch.randn(3, 72).to(fp8.FP8)
    with pytest.raises(AssertionError, match="divisible by 16"):
        torch._scaled_mm(xq, w.q.t(), scale_a=torch.ones(3, 1), scale_b=w.scale.view(1, -1), out_dtype=torch.bfloat16)
    w = fp8.quantize(torch.randn(32, 64))
    xq = torch.randn(3, 64).to(fp8.FP8)
    with pytest.raises(AssertionError, match="bfloat16 only"):
        torch._scaled_mm(xq, w.q.t(), scale_a=torch.ones(3, 1), scale_b=w.scale.view(1, -1), out_dtype=torch.float16)


def test_an_fp8_checkpoint_through_the_engine_on_scaled_mm(
    quant_models: QuantModels, cuda_checks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's FP8 path as an FP8 GPU plans it (scaled_mm), here on the CPU's kernel: every call passes CUDA's
    checks and the log-probabilities stay within tests/quant/test_gpu.py's tolerance of float32 on the checkpoint's
    weights."""
    monkeypatch.setattr(model_runner, "resolve_quant_kernel", lambda *a: "scaled_mm")
    llm = LLM(str(quant_models("fp8")), dtype="bfloat16", **CONFIG)
    try:
        assert llm.engine.runner.plan.quant.endswith("on scaled_mm")
        ref = _reference(quant_models, "fp8", torch.bfloat16)
        for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW))):
            chosen = _chosen_log_probs(ref, prompt, out.token_ids)
            assert (torch.tensor(out.logprobs) - chosen).abs().mean() < FP8_TOL
    finally:
        llm.close()
