"""One step of every dense family, and the batched sampler's processing, with the model, the cache and the logits on
torch.device("meta"): a tensor made on the CPU in per-step code (a mask, an arange, a table built without device=)
meets the meta tensors and raises, as it would meet CUDA tensors on a GPU: meta alone lets CPU indices through
(`index_select`, indexing), so the step runs under `NoDeviceMix`, which refuses any call mixing the two. On the CPU
such a tensor goes unnoticed.
MoE families read their routing counts on the host (no graphs for them) and T5 runs its encoder in the step; both
are left out.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from engine.attention.base import attention_metadata
from engine.attention.torch_twin import TorchBackend
from engine.models import get_model_class
from engine.sampler import Sampler, SamplingRequest, _Rows
from engine.sampling_params import SamplingParams
from engine.step_input import StepInput
from tests.unit.test_meta_build import MODEL_TYPES, ROPES, _config

META = torch.device("meta")
BLOCK = 16
SKIPPED = {"mixtral", "qwen2_moe", "qwen3_moe", "t5"}
DENSE = sorted(a for a, t in MODEL_TYPES.items() if t not in SKIPPED)
MOVES = {torch.Tensor.to, torch.Tensor.copy_}


class NoDeviceMix(TorchFunctionMode):
    """Raises where one call takes a meta tensor and a tensor elsewhere (CPU) - as CUDA raises for a CUDA tensor
    next to a CPU one, which meta alone lets through for indices (`index_select`, indexing). 0-d CPU tensors are
    scalars, which CUDA takes too; explicit moves (`.to`, `copy_`) are what the GPU path does on purpose."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func not in MOVES:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            devices = {t.device.type for t in tensors if t.dim() > 0 or t.device.type != "cpu"}
            if "meta" in devices and len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(devices)}")
        return func(*args, **kwargs)


def _mixed_step() -> StepInput:
    """Two decode rows (contexts of 20 and 33 tokens), a fresh 5-token prompt and a chunk over a cached prefix."""
    step = StepInput()
    for n, table in ((20, [3, 4]), (33, [5, 6, 7])):
        step.input_ids.append(7)
        step.positions.append(n - 1)
        step.slots.append(table[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK)
        step.decode_tables.append(table)
        step.decode_lens.append(n)
        step.sample_rows.append(len(step.input_ids) - 1)
    for start, end, table in ((0, 5, [8]), (16, 24, [9, 10])):
        step.prefills.append((len(step.input_ids), start, end, table))
        step.input_ids.extend(range(start, end))
        step.positions.extend(range(start, end))
        step.slots.extend(table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end))
        step.sample_rows.append(len(step.input_ids) - 1)
    return step


@pytest.mark.parametrize("architecture", DENSE)
def test_a_mixed_step_stays_on_the_model_device(architecture: str) -> None:
    cfg = _config(architecture, ROPES["default"])
    with torch.device(META):
        model = get_model_class(cfg)(cfg, max_position=256).eval()
    layers = model.attention_layers()
    backend = TorchBackend(META, torch.float32, BLOCK)
    backend.bind(layers[0].num_kv_heads, general=any(layer.has_options for layer in layers))
    for layer in layers:
        layer.bind(backend, *backend.allocate(16, layer.num_kv_heads, layer.head_dim))
    step = _mixed_step()
    tensors = backend.step_tensors(step)
    with torch.inference_mode(), attention_metadata(tensors.meta), NoDeviceMix():
        hidden = model(tensors.input_ids, tensors.positions)
        logits = model.compute_logits(hidden.index_select(0, tensors.sample_rows))
    assert logits.device == META and tuple(logits.shape) == (len(step.sample_rows), cfg.vocab_size)


def test_the_check_catches_what_meta_alone_lets_through() -> None:
    x = torch.empty(4, 3, device=META)
    x.index_select(0, torch.tensor([1, 2]))  # meta alone: no error, where CUDA raises
    with NoDeviceMix(), pytest.raises(RuntimeError, match="mixes devices"):
        x.index_select(0, torch.tensor([1, 2]))
    with NoDeviceMix():
        x * torch.tensor(2.0)  # a 0-d CPU scalar: CUDA takes it too
        x[:2].copy_(torch.ones(2, 3))  # an explicit move


def test_the_batched_sampler_stays_on_the_logits_device() -> None:
    vocab = 100
    kinds = [
        SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5),
        SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
        SamplingParams(do_sample=True, typical_p=0.8),
        SamplingParams(do_sample=True, top_p=0.5),  # with a grammar mask below
    ]
    requests = [SamplingRequest(p, [1, 5, 5, 9]) for p in kinds]
    requests[3].allowed = torch.full(((vocab + 31) // 32,), -1, dtype=torch.int32)
    logits = torch.empty(len(requests), vocab, device=META)
    rows = _Rows.build(list(range(len(requests))), requests, vocab, META)
    with NoDeviceMix():
        picked, failed, index = Sampler()._process(logits, rows)
    assert {picked.device, failed.device, index.device} == {META}
