"""Quantized models built and loaded for another device than the CPU's, the way a GPU plans them (Triton, scaled_mm,
bitsandbytes' kernels), with `meta` standing in for CUDA: every tensor the loaded model holds (parameters, buffers
and the quantized matmuls' plain tensor attributes: codes, scales, offsets, act-order permutations, FP8 scales,
bitsandbytes states) is on that device, none left on the CPU where a GPU kernel would read it. And bitsandbytes'
LLM.int8 in bfloat16 writes no log line per call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from engine.device import default_dtype
from engine.loader import iter_weights
from engine.model_source import load_hf_config, resolve_model
from engine.models import get_model_class
from engine.parallel import SINGLE_RANK, building_with
from engine.quant import bnb
from engine.quant.config import resolve_quantization
from engine.quant.layer import QuantBuild, building_quantized, finish
from engine.quant.matmul import BnbMatmul
from tests.quant.quant_models import QuantModels
from tests.quant.test_engine import CHECKPOINTS, _model

GPU_KERNEL = {"fp8": "scaled_mm", "bitsandbytes": "bitsandbytes", "bitsandbytes-nf4": "bitsandbytes"}


def _walk(value: object, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors reachable from a module attribute: in dicts, lists, dataclasses and library state objects."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, nn.Module) or depth > 4:
        return  # modules are walked on their own
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]", depth + 1)
    elif dataclasses.is_dataclass(value) or type(value).__module__.startswith(("engine", "bitsandbytes")):
        for k, v in vars(value).items():
            yield from _walk(v, f"{path}.{k}", depth + 1)


def held_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            yield from _walk(value, f"{name}.{attr}")


@pytest.mark.parametrize("method", ["gptq", "gptq_act", "awq", "fp8", "int4", "int8", "bitsandbytes",
                                    "bitsandbytes-nf4"])  # fmt: skip
def test_a_quantized_model_loads_wholly_onto_its_device(method: str, quant_models: QuantModels) -> None:
    if method.startswith("bitsandbytes"):
        pytest.importorskip("bitsandbytes")
    path, requested = _model(quant_models, method)
    files = resolve_model(path)
    hf_config = load_hf_config(files)
    meta = torch.device("meta")
    quant = resolve_quantization(requested, hf_config, False, torch.device("cpu"))
    assert quant is not None
    build = QuantBuild(quant, GPU_KERNEL.get(method, "triton"), meta, torch.bfloat16)
    with default_dtype(torch.bfloat16), meta, building_with(SINGLE_RANK), building_quantized(build):
        model = get_model_class(hf_config)(hf_config, max_position=256)
    model.load_weights(iter_weights(files, hf_config))
    finish(model)
    quantized = [m for m in model.modules() if getattr(m, "qmatmul", None) is not None]
    assert len(quantized) == 2 * 4  # per layer: qkv, o, gate_up, down
    if method == "gptq_act":
        assert all(m.qmatmul.perm is not None for m in quantized)
    tensors = dict(held_tensors(model))
    assert len(tensors) > 4 * len(quantized)
    elsewhere = {name: t.device.type for name, t in tensors.items() if t.device.type != "meta"}
    assert not elsewhere, elsewhere
    assert set(CHECKPOINTS) <= {"gptq", "gptq_act", "awq", "fp8"}  # every checkpoint format is covered above


def test_llm_int8_in_bfloat16_logs_nothing_per_call(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    layer = BnbMatmul(bnb.quantize(torch.randn(48, 64, generator=g), "bitsandbytes", torch.device("cpu"),
                                   torch.bfloat16), "bitsandbytes")  # fmt: skip
    x = torch.randn(3, 64, generator=g).bfloat16()
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            y = layer(x, None)
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")], caplog.text
    assert y.dtype == torch.bfloat16
    want = layer.twin(x.float(), None)
    assert (y.float() - want).abs().max() < 0.05 * want.abs().max()  # activations rounded to int8 per row
