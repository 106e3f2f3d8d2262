"""CUDA only (tests/gpu/run.sh on a lent GPU): the Triton int kernel against its twin on CUDA tensors, and quantized
tiny models on the GPU against float32 on their dequantized weights (the bfloat16 tolerance of test_engine.py):
GPTQ / AWQ / int4 / int8 on Triton, bitsandbytes on its CUDA kernels, FP8 on `torch._scaled_mm` (sm89+).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.quant import cpu_kernel
from engine.quant.int_weight import quantize
from tests.quant.quant_models import QuantModels
from tests.quant.test_engine import CONFIG, NEW, PROMPTS, _model, _ref_log_probs, _reference
from tests.support.tiny_models import greedy

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


@pytest.mark.parametrize("method", ["gptq", "awq", "int4", "int8", "bitsandbytes-nf4", "fp8"])
def test_quantized_models_on_the_gpu(method: str, quant_models: QuantModels) -> None:
    if method.startswith("bits"):
        pytest.importorskip("bitsandbytes")
    path, quantize_ = _model(quant_models, method)
    kernel = {"fp8": "scaled_mm" if _fp8_gpu() else "dequantized"}.get(method, "triton")
    kernel = "bitsandbytes" if method.startswith("bits") else kernel
    llm = LLM(path, device="cuda", dtype="bfloat16", quantize=quantize_, **CONFIG)
    assert llm.engine.runner.plan.quant.endswith(f"on {kernel}")
    ref = _reference(quant_models, method, torch.bfloat16)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy(NEW))):
        lp = _ref_log_probs(ref, prompt, out.token_ids)
        chosen = lp.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert (torch.tensor(out.logprobs) - chosen).abs().mean() < (0.1 if method == "fp8" else 0.08)
    llm.close()
