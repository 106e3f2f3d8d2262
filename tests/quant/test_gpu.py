"""CUDA only (tests/gpu/run.sh on a lent GPU): the Triton int kernel against its twin on CUDA tensors, and quantized
tiny models on the GPU against float32 on their dequantized weights (the bfloat16 tolerance of test_engine.py):
GPTQ (act-order too) / AWQ / int4 / int8 on Triton, bitsandbytes (LLM.int8, NF4) on its CUDA kernels (where
tests/gpu/site.sh carried it), FP8 on `torch._scaled_mm` (sm89+).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.quant import cpu_kernel
from engine.quant.int_weight import quantize
from tests.quant.quant_models import QuantModels
from tests.quant.test_engine import BF16_TOL, CONFIG, NEW, PROMPTS, _chosen_log_probs, _model, _reference
from tests.support.tiny_models import greedy

# mean |logprob| difference per token against float32 on the dequantized weights. FP8 also rounds activations to
# e4m3 per token, which moves this tiny model's log-probabilities by 0.16-0.23 (measured on the CPU's _scaled_mm in
# tests/quant/test_scaled_mm.py; weight-only 0.02); a wrong scale or layout gives about 2.
TOL, FP8_TOL = 0.08, 0.35

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("bits", [4, 8])
def test_triton_kernel_matches_its_twin_on_cuda(bits: int) -> None:
    from engine.quant import triton_kernel

    w = quantize(torch.randn(1000, 4096), bits, 128)
    p = cpu_kernel.pack(w)
    p = cpu_kernel.PackedInt(p.codes.cuda(), p.scales.cuda(), None if p.offsets is None else p.offsets.cuda(),
                             p.bits, p.offset_kind, p.group_size, p.n, p.k, None)  # fmt: skip
    for rows in (1, 64, 300):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        got = triton_kernel.linear(x, p).float()
        want = F.linear(x.float(), w.dequantize().cuda().bfloat16().float())
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)


def _fp8_gpu() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


METHODS = ["gptq", "gptq_act", "awq", "int4", "int8", "bitsandbytes", "bitsandbytes-nf4", "fp8"]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_models_on_the_gpu(method: str, quant_models: QuantModels) -> None:
    """Decode steps replayed as CUDA graphs hold the Triton and scaled_mm matmuls (bitsandbytes' LLM.int8 reads its
    outliers on the host: no graphs over any bitsandbytes mode)."""
    bits = method.startswith("bits")
    if bits:
        pytest.importorskip("bitsandbytes")
    path, quantize_ = _model(quant_models, method)
    kernel = "bitsandbytes" if bits else {"fp8": "scaled_mm" if _fp8_gpu() else "dequantized"}.get(method, "triton")
    tol = FP8_TOL if method == "fp8" else BF16_TOL.get(method, TOL)
    llm = LLM(path, device="cuda", dtype="bfloat16", quantize=quantize_, **CONFIG)
    try:
        plan = llm.engine.runner.plan
        assert plan.quant.endswith(f"on {kernel}"), plan.quant
        assert bool(plan.cuda_graphs) != bits, plan.describe()
        ref = _reference(quant_models, method, torch.bfloat16)
        for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW))):
            chosen = _chosen_log_probs(ref, prompt, out.token_ids)
            assert (torch.tensor(out.logprobs) - chosen).abs().mean() < tol, (method, out.logprobs)
    finally:
        llm.close()
